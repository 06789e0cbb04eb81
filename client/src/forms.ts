// Input checks for command forms, in plain words. A field is either a valid value or a
// message for the operator: nothing empty, blank, hexadecimal or exponent-shaped is ever
// turned into a number (`Number("")` is 0 and `Number("0x10")` is 16).
import type { ChannelConfig } from "./rest.js";

export type Checked<T> = { ok: true; value: T } | { ok: false; message: string };

const DECIMAL = /^[+-]?(?:\d+(?:\.\d*)?|\.\d+)$/;
const WHOLE = /^\d+$/;

/** A plain decimal number as typed by a person ("50", "-12.5"), or why not. */
export function parseDecimal(text: string): Checked<number> {
  const trimmed = text.trim();
  if (trimmed === "") return { ok: false, message: "Enter a value." };
  if (!DECIMAL.test(trimmed)) {
    return { ok: false, message: `"${trimmed.slice(0, 20)}" is not a plain number (use digits, e.g. 50 or -12.5).` };
  }
  const value = Number(trimmed);
  if (!Number.isFinite(value)) return { ok: false, message: "That number is too large." };
  return { ok: true, value };
}

/** A whole number within [min, max] ("minutes", "seconds" name the quantity). */
export function parseWhole(text: string, min: number, max: number, what: string): Checked<number> {
  const trimmed = text.trim();
  if (trimmed === "") return { ok: false, message: `Enter the ${what}.` };
  if (!WHOLE.test(trimmed)) return { ok: false, message: `The ${what} must be a whole number, e.g. ${min === 1 ? 60 : min}.` };
  const value = Number(trimmed);
  if (value < min || value > max) {
    return { ok: false, message: `The ${what} must be between ${min} and ${max}.` };
  }
  return { ok: true, value };
}

/** Units a person may type a channel's value in, with the factor to the channel's unit. */
export function unitChoices(channelUnit: string): { unit: string; factor: number }[] {
  if (channelUnit === "W") return [{ unit: "kW", factor: 1000 }, { unit: "W", factor: 1 }];
  if (channelUnit === "kW") return [{ unit: "kW", factor: 1 }, { unit: "W", factor: 0.001 }];
  return [{ unit: channelUnit || "", factor: 1 }];
}

/** "100 kW" / "-5 %": a channel value shown in the unit the operator picked. */
export function formatIn(value: number, unit: string, factor: number): string {
  const shown = Math.round((value / factor) * 1000) / 1000;
  return `${shown.toLocaleString("en-US")} ${unit}`.trim();
}

const INTEGER_TYPES = new Set(["int16", "uint16", "int32", "uint32"]);

/** The typed value converted to the channel's unit and checked against its limits. */
export function checkChannelValue(
  text: string,
  channel: ChannelConfig,
  unit: string,
): Checked<number> {
  const parsed = parseDecimal(text);
  if (!parsed.ok) return parsed;
  const choice = unitChoices(channel.unit).find((c) => c.unit === unit) ?? { unit, factor: 1 };
  const exact = parsed.value * choice.factor;
  let value = Math.round(exact * 1e6) / 1e6;
  if (INTEGER_TYPES.has(channel.data_type)) {
    const whole = Math.round(exact);
    if (Math.abs(exact - whole) > 1e-6) {
      const step = formatIn(1, choice.unit, choice.factor);
      return { ok: false, message: `This channel takes steps of 1 ${channel.unit}; ${step} is the finest step.` };
    }
    value = whole;
  }
  const min = channel.min ?? undefined;
  const max = channel.max ?? undefined;
  if ((min !== undefined && value < min) || (max !== undefined && value > max)) {
    const lo = min === undefined ? "no lower limit" : formatIn(min, choice.unit, choice.factor);
    const hi = max === undefined ? "no upper limit" : formatIn(max, choice.unit, choice.factor);
    return { ok: false, message: `Out of range: the limits are ${lo} to ${hi}.` };
  }
  return { ok: true, value };
}

/** A change large enough to ask for confirmation: over half the channel's limit. */
export function isLargeChange(value: number, channel: ChannelConfig): boolean {
  const bound = Math.max(Math.abs(channel.min ?? 0), Math.abs(channel.max ?? 0));
  return bound > 0 && Math.abs(value) > bound / 2;
}
