export * from "./types.js";
export * from "./lifecycle.js";
export * from "./rest.js";
export * from "./client.js";
export { newCommandId } from "./ids.js";
export * from "./forms.js";
