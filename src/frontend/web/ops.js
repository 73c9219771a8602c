// The operator view: polls /ops/state (token in this tab's sessionStorage)
// and draws the nodes, the traffic of the last minutes and the fault timeline.
"use strict";

const $ = (sel) => document.querySelector(sel);
const TOKEN = "pygmy-ops-token";
const SVG = "http://www.w3.org/2000/svg";
let timer = null;

function el(tag, attrs, ...kids) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "text") e.textContent = v;
    else e.setAttribute(k, v);
  }
  for (const k of kids) e.append(k);
  return e;
}

const ver = (v) => (v ? v.epoch + "." + v.seq : "–");
const clock = (ms) => new Date(ms).toLocaleTimeString([], { hour12: false }) + "." + String(ms % 1000).padStart(3, "0");

async function call(method, path, body) {
  const headers = { Authorization: "Bearer " + sessionStorage.getItem(TOKEN) };
  if (body) headers["Content-Type"] = "application/json";
  const res = await fetch(path, { method, headers, body: body ? JSON.stringify(body) : undefined, cache: "no-store" });
  let data = null;
  try { data = await res.json(); } catch (_) { /* not JSON */ }
  if (!res.ok) {
    const e = new Error((data && data.message) || "answered " + res.status);
    e.status = res.status;
    throw e;
  }
  return data;
}

function badge(text, cls) {
  return el("span", { class: "badge " + (cls || "") }, text);
}

function drawNodes(s) {
  const rows = s.nodes.map((n) => {
    const role = !n.reachable ? badge("was " + n.role)
      : n.role === "primary" ? badge("primary", "primary")
      : n.role === "candidate" ? badge("candidate", "candidate") : badge(n.role);
    const reach = n.reachable ? badge("up", "up") : badge("down" + (n.error ? ": " + n.error : ""), "down");
    const cells = [
      el("th", { scope: "row", text: n.name }),
      el("td", {}, role),
      el("td", {}, reach),
      el("td", { text: n.epoch == null ? "–" : String(n.epoch) }),
      el("td", { text: n.primary || "–" }),
      el("td", { text: ver(n.applied) }),
      el("td", { text: ver(n.commit) }),
      el("td", { text: n.in_view == null ? "–" : n.in_view ? "yes" : "no" }),
      el("td", { text: n.lag == null ? "–" : String(n.lag) }),
      el("td", { text: n.view && n.view.length ? n.view.join(", ") : "–" }),
    ];
    return el("tr", { class: n.reachable ? "" : "down", "data-node": n.name, "data-role": n.role, "data-reachable": String(n.reachable) }, ...cells);
  });
  $("#nodes tbody").replaceChildren(...rows);
  const p = $("#primary");
  p.replaceChildren();
  if (s.primary) {
    p.append("Primary: ", el("strong", { id: "primary-name", text: s.primary }), " (epoch " + s.epoch + ")");
  } else {
    p.append(el("strong", { id: "primary-name", text: "none" }), " — no catalog primary answers: failover in progress");
  }
}

function spark(id, values, fmt) {
  const fig = $(id);
  const w = 300, h = 80;
  const pts = values.map((v, i) => [i, v]).filter(([, v]) => v != null);
  const max = Math.max(1e-9, ...pts.map(([, v]) => v));
  const n = Math.max(values.length - 1, 1);
  const svg = document.createElementNS(SVG, "svg");
  svg.setAttribute("viewBox", "0 0 " + w + " " + h);
  svg.setAttribute("preserveAspectRatio", "none");
  svg.setAttribute("aria-hidden", "true");
  const line = document.createElementNS(SVG, "polyline");
  line.setAttribute("fill", "none");
  line.setAttribute("stroke", "#1d4e89");
  line.setAttribute("stroke-width", "2");
  line.setAttribute("vector-effect", "non-scaling-stroke");
  line.setAttribute("points", pts.map(([i, v]) => ((i / n) * w).toFixed(1) + "," + (h - 2 - (v / max) * (h - 4)).toFixed(1)).join(" "));
  svg.append(line);
  if (pts.length) {
    const [i, v] = pts[pts.length - 1];
    const dot = document.createElementNS(SVG, "circle");
    dot.setAttribute("cx", ((i / n) * w).toFixed(1));
    dot.setAttribute("cy", (h - 2 - (v / max) * (h - 4)).toFixed(1));
    dot.setAttribute("r", "3");
    dot.setAttribute("fill", "#1d4e89");
    svg.append(dot);
  }
  const last = pts.length ? pts[pts.length - 1][1] : null;
  fig.querySelector(".now").textContent = last == null ? "–" : fmt(last) + " (peak " + fmt(max) + ")";
  const old = fig.querySelector("svg");
  if (old) old.replaceWith(svg);
  else fig.append(svg);
}

function drawSeries(s) {
  spark("#chart-buys", s.series.map((x) => x.buys), (v) => v.toFixed(0));
  spark("#chart-latency", s.series.map((x) => x.lookup_ms_avg), (v) => v.toFixed(2) + " ms");
  spark("#chart-hits", s.series.map((x) => x.cache_hit_rate), (v) => (v * 100).toFixed(0) + " %");
}

function drawEvents(s) {
  const items = s.events.slice().reverse().map((e) =>
    el("li", { "data-kind": e.kind },
      el("time", { datetime: new Date(e.at_ms).toISOString(), text: clock(e.at_ms) }),
      el("span", { class: "kind k-" + e.kind.replace(" ", "-"), text: e.kind }),
      e.text));
  $("#events").replaceChildren(...(items.length ? items : [el("li", { text: "No events yet." })]));
}

async function poll() {
  clearTimeout(timer);
  try {
    const s = await call("GET", "/ops/state");
    $("#login").hidden = true;
    $("#cluster").hidden = false;
    drawNodes(s);
    drawSeries(s);
    drawEvents(s);
    $("#live").textContent = "live, updated " + clock(s.at_ms);
  } catch (err) {
    if (err.status === 401 || err.status === 403) {
      sessionStorage.removeItem(TOKEN);
      $("#cluster").hidden = true;
      $("#login").hidden = false;
      $("#login-msg").replaceChildren(el("p", { class: "msg bad", text: "That token was not accepted." }));
      $("#live").textContent = "not connected";
      return;
    }
    $("#live").textContent = "lost contact with the frontend; retrying…";
  }
  timer = setTimeout(poll, 1000);
}

document.addEventListener("DOMContentLoaded", () => {
  $("#token-form").addEventListener("submit", (e) => {
    e.preventDefault();
    sessionStorage.setItem(TOKEN, $("#token").value.trim());
    $("#token").value = "";
    $("#login-msg").replaceChildren();
    poll();
  });
  $("#restock").addEventListener("submit", async (e) => {
    e.preventDefault();
    const id = Number($("#restock-id").value), stock = Number($("#restock-stock").value);
    const msg = $("#restock-msg");
    try {
      const r = await call("POST", "/ops/restock", { id, stock });
      msg.replaceChildren(el("p", { class: "msg ok", text: "Book " + id + " now has " + stock + " in stock (version " + ver(r.version) + ")." }));
    } catch (err) {
      msg.replaceChildren(el("p", { class: "msg bad", text: "Restock failed: " + err.message }));
    }
  });
  if (sessionStorage.getItem(TOKEN)) poll();
});
