// Small DOM helpers: elements built from data through textContent only, focus kept
// across re-renders, words for times and values.

export const $ = (id) => document.getElementById(id);

export function el(tag, props = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(props)) {
    if (key === "class") node.className = value;
    else if (key === "text") node.textContent = value;
    else if (key.startsWith("data-")) node.setAttribute(key, value);
    else if (key.startsWith("aria-")) node.setAttribute(key, value);
    else node[key] = value;
  }
  for (const child of children) if (child != null) node.append(child);
  return node;
}

/** Replace a container's children without losing the keyboard focus inside it. */
export function replaceKeepingFocus(container, children) {
  const key = document.activeElement?.dataset?.focusKey;
  container.replaceChildren(...children);
  if (key) container.querySelector(`[data-focus-key="${CSS.escape(key)}"]`)?.focus();
}

export function announce(text) {
  const region = $("announce");
  region.textContent = "";
  // A fresh text node makes screen readers read it even when it repeats.
  setTimeout(() => { region.textContent = text; }, 30);
}

export function age(iso) {
  if (!iso) return "";
  const s = Math.max(0, Math.round((Date.now() - Date.parse(iso)) / 1000));
  if (s < 60) return `${s} s`;
  if (s < 3600) return `${Math.floor(s / 60)} min`;
  if (s < 86400) return `${Math.floor(s / 3600)} h ${Math.floor((s % 3600) / 60)} min`;
  return `${Math.floor(s / 86400)} d`;
}

export function clock(iso) {
  return iso ? iso.replace("T", " ").replace("Z", "") : "";
}

export function showValue(value, unit) {
  if (typeof value !== "number") return String(value ?? "");
  if (unit === "W" && Math.abs(value) >= 1000) return `${value / 1000} kW (${value} W)`;
  return `${value}${unit ? " " + unit : ""}`;
}
