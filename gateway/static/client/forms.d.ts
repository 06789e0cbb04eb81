import type { ChannelConfig } from "./rest.js";
export type Checked<T> = {
    ok: true;
    value: T;
} | {
    ok: false;
    message: string;
};
/** A plain decimal number as typed by a person ("50", "-12.5"), or why not. */
export declare function parseDecimal(text: string): Checked<number>;
/** A whole number within [min, max] ("minutes", "seconds" name the quantity). */
export declare function parseWhole(text: string, min: number, max: number, what: string): Checked<number>;
/** Units a person may type a channel's value in, with the factor to the channel's unit. */
export declare function unitChoices(channelUnit: string): {
    unit: string;
    factor: number;
}[];
/** "100 kW" / "-5 %": a channel value shown in the unit the operator picked. */
export declare function formatIn(value: number, unit: string, factor: number): string;
/** The typed value converted to the channel's unit and checked against its limits. */
export declare function checkChannelValue(text: string, channel: ChannelConfig, unit: string): Checked<number>;
/** A change large enough to ask for confirmation: over half the channel's limit. */
export declare function isLargeChange(value: number, channel: ChannelConfig): boolean;
