import type { StatusUpdate } from "./types.js";
/** Statuses after which nothing more happens to a command. */
export declare const FINAL: ReadonlySet<string>;
export declare function rank(status: string): number;
/** True when `next` should replace `current` as the command's current status. */
export declare function replaces(current: StatusUpdate | undefined, next: StatusUpdate): boolean;
/** A failure that is not an operator's concern: a newer setpoint replaced this one. */
export declare function isSuperseded(update: StatusUpdate): boolean;
/** The command has its answer: no need to keep the Send button disabled for it. */
export declare function answered(status: string): boolean;
/** A WebSocket close code in plain words. */
export declare function closeCodeWords(code: number): string;
/** An error in plain words, followed by the gateway's or edge's detail. */
export declare function errorWords(error: {
    code: string;
    message: string;
}): string;
