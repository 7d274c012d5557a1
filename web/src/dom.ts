/** Tiny DOM helpers: elements from tag, attributes and children; messages for the user. */

type Child = Node | string | number | null | undefined | false | Child[];

export function h<K extends keyof HTMLElementTagNameMap>(
  tag: K,
  attrs: Record<string, string | boolean | number | EventListener> = {},
  ...children: Child[]
): HTMLElementTagNameMap[K] {
  const el = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs)) {
    if (typeof value === "function") el.addEventListener(name.slice(2), value);
    else if (value === true) el.setAttribute(name, "");
    else if (value !== false) el.setAttribute(name, String(value));
  }
  for (const child of children.flat(Infinity as 1) as Child[]) {
    if (child !== null && child !== undefined && child !== false) el.append(child instanceof Node ? child : String(child));
  }
  return el;
}

export const $ = <T extends HTMLElement = HTMLElement>(selector: string): T => document.querySelector(selector) as T;

/** Shows a message in the page's status line (errors as alerts). */
export function say(text: string, error = false): void {
  const line = $("#message");
  line.textContent = text;
  line.setAttribute("role", error ? "alert" : "status");
  line.className = error ? "error" : "";
}

/** Saves `data` as a file the browser downloads. */
export function download(name: string, data: BlobPart, type = "application/octet-stream"): void {
  const url = URL.createObjectURL(new Blob([data], { type }));
  const a = h("a", { href: url, download: name });
  document.body.append(a);
  a.click();
  a.remove();
  setTimeout(() => URL.revokeObjectURL(url), 60_000);
}
