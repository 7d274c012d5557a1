/** Server: health over gRPC-Web (V2 ServerLive/ServerReady) and key figures from its Prometheus metrics as small charts. */
import { v2, withAuth } from "./api.js";
import { $, h } from "./dom.js";

type Sample = { at: number; values: Map<string, number> };
const POINTS = 60;
const SVG = "http://www.w3.org/2000/svg";
const history: Sample[] = [];

/** Prometheus text format: "name{labels} value" lines, keyed by name and sorted label pairs. */
function parse(text: string): Map<string, number> {
  const values = new Map<string, number>();
  for (const line of text.split("\n")) {
    const match = /^([a-zA-Z_:][\w:]*)(\{.*\})?\s+(\S+)/.exec(line);
    if (match) values.set(match[1] + (match[2] ?? ""), Number(match[3]));
  }
  return values;
}

/** The sum of a metric over the series whose labels contain `filter`, grouped by the value of label `by`. */
function grouped(values: Map<string, number>, name: string, by: string): Map<string, number> {
  const out = new Map<string, number>();
  for (const [key, value] of values) {
    if (!key.startsWith(`${name}{`) && key !== name) continue;
    const group = new RegExp(`${by}="([^"]*)"`).exec(key)?.[1] ?? "";
    out.set(group, (out.get(group) ?? 0) + value);
  }
  return out;
}

/** A series of points as a small SVG line chart with its last value in words. */
function chart(title: string, unit: string, points: (number | null)[]): HTMLElement {
  const known = points.filter((p): p is number => p !== null);
  const top = Math.max(...known, 0);
  const step = 300 / (POINTS - 1);
  const offset = POINTS - points.length;
  const y = (p: number) => (top ? 78 - (p / top) * 74 : 78).toFixed(1);
  const coords = points.flatMap((p, i) => (p === null ? [] : [`${((offset + i) * step).toFixed(1)},${y(p)}`]));
  const svg = document.createElementNS(SVG, "svg");
  svg.setAttribute("viewBox", "0 0 300 80");
  svg.setAttribute("role", "img");
  svg.setAttribute("aria-label", title); // an attribute value: a model name in it is never markup
  const line = document.createElementNS(SVG, "polyline");
  line.setAttribute("points", coords.join(" "));
  svg.append(line);
  const last = known.length ? `${known[known.length - 1].toPrecision(3)} ${unit}` : "no calls lately";
  const range = known.length ? ` (max ${top.toPrecision(3)})` : "";
  const figure = h("figure", { class: "chart" }, h("figcaption", {}, `${title}: `, h("strong", {}, last), range));
  figure.append(svg);
  return figure;
}

function rate(name: string, by: string, divideBy?: string): Map<string, (number | null)[]> {
  const series = new Map<string, (number | null)[]>();
  for (let i = 1; i < history.length; i++) {
    const [a, b] = [history[i - 1], history[i]];
    const now = grouped(b.values, name, by), before = grouped(a.values, name, by);
    const nowCount = divideBy ? grouped(b.values, divideBy, by) : undefined;
    const beforeCount = divideBy ? grouped(a.values, divideBy, by) : undefined;
    for (const [group, value] of now) {
      const delta = value - (before.get(group) ?? 0);
      const per = nowCount ? (nowCount.get(group) ?? 0) - (beforeCount!.get(group) ?? 0) : (b.at - a.at) / 1000;
      const points = series.get(group) ?? Array(i - 1).fill(null);
      points.push(per > 0 ? delta / per : null);
      series.set(group, points);
    }
  }
  return series;
}

async function pollMetrics(): Promise<void> {
  const reply = await fetch("/ui/metrics");
  if (!reply.ok) {
    $("#charts").replaceChildren(h("p", {}, `Metrics: ${(await reply.text()).trim() || reply.statusText}`));
    return;
  }
  history.push({ at: performance.now(), values: parse(await reply.text()) });
  if (history.length > POINTS + 1) history.shift();
  const total = rate("mds_requests_total", "__none__").get("") ?? [];
  const latency = rate("mds_request_seconds_sum", "model", "mds_request_seconds_count");
  latency.delete("");
  const jobs = grouped(history[history.length - 1].values, "mds_jobs", "state");
  $("#charts").replaceChildren(
    chart("Requests per second", "req/s", total),
    ...[...latency].slice(0, 8).map(([model, points]) => chart(`Mean latency of ${model}`, "ms", points.map((p) => (p === null ? null : p * 1000)))),
    h("p", {}, "Jobs by state: ", [...jobs].map(([state, n]) => `${state} ${n}`).join(", ") || "–"),
  );
}

async function checkHealth(): Promise<void> {
  const [live, ready] = await withAuth(() => Promise.all([v2.serverLive({}), v2.serverReady({})]));
  $("#health").textContent = `live: ${live.live ? "yes" : "no"}, ready: ${ready.ready ? "yes" : "no"}`;
}

/** Checks health and samples the metrics now and every 2 s while the page is visible. */
export function watchServer(): void {
  const tick = () => {
    if (document.hidden) return;
    checkHealth().catch(() => ($("#health").textContent = "not answering"));
    pollMetrics().catch(() => undefined);
  };
  tick();
  setInterval(tick, 2000);
}
