// The storefront: browse topics, search titles, open a book, buy it.
// Pages are hash routes (#/topic/SLUG, #/search/WORDS, #/book/ID), so the
// back button and reloads work. No dependencies.
"use strict";

const $ = (sel) => document.querySelector(sel);
let topics = null; // slug -> display name

function el(tag, attrs, ...kids) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "text") e.textContent = v;
    else e.setAttribute(k, v);
  }
  for (const k of kids) e.append(k);
  return e;
}

const money = (n) => "$" + Number(n).toFixed(2);

// A failed request, told to people in plain words.
class StoreError extends Error {
  constructor(status, message) { super(message); this.status = status; }
}

const UNAVAILABLE = "The store is switching over to a backup server right now. Please try again in a moment.";
const SOLD_OUT = "None in stock: try anyway";
const OFFLINE = "We cannot reach the store. Check your connection and try again.";

async function api(method, path, headers) {
  let res;
  try {
    res = await fetch(path, { method, headers: headers || {}, cache: "no-store" });
  } catch (_) {
    throw new StoreError(0, OFFLINE);
  }
  let body = null;
  try { body = await res.json(); } catch (_) { /* not JSON */ }
  if (res.ok && body) return body;
  if (res.status === 503 || res.status === 408 || res.status === 429 || res.status >= 500) {
    throw new StoreError(503, UNAVAILABLE);
  }
  throw new StoreError(res.status, (body && body.message) || "Something went wrong.");
}

function show(title, ...content) {
  const view = $("#view");
  view.replaceChildren(el("h2", { id: "view-title", text: title }), ...content);
  document.title = title + " — Pygmy.com";
}

function notice(kind, text) {
  const n = $("#notice");
  n.replaceChildren();
  if (text) n.append(el("p", { class: "msg " + kind, text }));
}

function retryButton(label) {
  const b = el("button", { type: "button", class: "secondary", text: label || "Try again" });
  b.addEventListener("click", route);
  return b;
}

function failure(title, err) {
  const kind = err.status === 503 || err.status === 0 ? "warn" : "bad";
  show(title, el("p", { class: "msg " + kind, role: "alert", text: err.message }), retryButton());
}

async function loadTopics() {
  if (topics) return topics;
  const t = await api("GET", "/topics");
  topics = t.topics;
  const ul = $("#topics");
  ul.replaceChildren(...Object.entries(topics).map(([slug, name]) =>
    el("li", {}, el("a", { href: "#/topic/" + slug, "data-topic": slug, text: name }))));
  return topics;
}

function markTopic(slug) {
  for (const a of document.querySelectorAll("#topics a")) {
    if (a.dataset.topic === slug) a.setAttribute("aria-current", "page");
    else a.removeAttribute("aria-current");
  }
}

function bookList(items) {
  const entries = Object.entries(items).sort((a, b) => a[0].localeCompare(b[0]));
  if (!entries.length) return el("p", { text: "No books found." });
  return el("ul", { class: "books" }, ...entries.map(([title, id]) =>
    el("li", {}, el("a", { href: "#/book/" + id, text: title }))));
}

async function showHome() {
  const ts = await loadTopics();
  const parts = [];
  for (const [slug, name] of Object.entries(ts)) {
    const r = await api("GET", "/search/" + slug);
    parts.push(el("section", { class: "card", "aria-label": name },
      el("h3", {}, el("a", { href: "#/topic/" + slug, text: name })), bookList(r.items)));
  }
  show("All books", ...parts);
}

async function showTopic(slug) {
  const ts = await loadTopics();
  markTopic(slug);
  const r = await api("GET", "/search/" + encodeURIComponent(slug));
  show(ts[slug] ? "Books on " + ts[slug] : "No such topic", bookList(r.items));
}

async function showSearch(q) {
  const ts = await loadTopics();
  $("#q").value = q;
  const words = q.toLowerCase().split(/\s+/).filter(Boolean);
  const found = {};
  for (const [slug, name] of Object.entries(ts)) {
    const r = await api("GET", "/search/" + slug);
    for (const [title, id] of Object.entries(r.items)) {
      const hay = (title + " " + name).toLowerCase();
      if (words.every((w) => hay.includes(w))) found[title] = id;
    }
  }
  const n = Object.keys(found).length;
  show("Search: " + q, el("p", { text: n + (n === 1 ? " book matches." : " books match.") }), bookList(found));
}

// ---- buying: one Idempotency-Key per buy intent, kept across reloads
const intentKey = (id) => "pygmy-buy-" + id;

function newKey() {
  const b = new Uint8Array(16);
  crypto.getRandomValues(b);
  return "web-" + Array.from(b, (x) => x.toString(16).padStart(2, "0")).join("");
}

async function showBook(id) {
  await loadTopics();
  markTopic(null);
  const b = await api("GET", "/lookup/" + encodeURIComponent(id));
  const slug = Object.keys(topics).find((s) => topics[s] === b.topic);
  const facts = el("dl", { class: "facts" },
    el("dt", { text: "Title" }), el("dd", { id: "book-title", text: b.title }),
    el("dt", { text: "Topic" }), el("dd", {}, slug ? el("a", { href: "#/topic/" + slug, text: b.topic }) : b.topic),
    el("dt", { text: "Price" }), el("dd", { id: "book-price", text: money(b.cost) }),
    el("dt", { text: "In stock" }), el("dd", { id: "book-stock", text: String(b.stock) }));
  const buy = el("button", { type: "button", id: "buy", text: "Buy for " + money(b.cost) });
  const result = el("div", { id: "buy-result", role: "status", "aria-live": "polite" });
  buy.addEventListener("click", () => purchase(b, buy, result));
  if (b.stock === 0) buy.textContent = SOLD_OUT;
  show(b.title, el("div", { class: "card" }, facts, buy), result);
  if (sessionStorage.getItem(intentKey(b.id))) {
    say(result, "warn", "Your last purchase of this book got no answer. Press Buy to finish it: it is the same order, so you pay at most once.");
    buy.textContent = "Finish purchase";
  }
}

function say(box, kind, text) {
  box.replaceChildren(el("p", { class: "msg " + kind, text }));
}

async function purchase(book, button, box) {
  if (button.disabled) return;
  button.disabled = true;
  let key = sessionStorage.getItem(intentKey(book.id));
  if (!key) {
    key = newKey();
    sessionStorage.setItem(intentKey(book.id), key);
  }
  say(box, "warn", "Buying…");
  try {
    const r = await api("POST", "/buy/" + book.id, { "Idempotency-Key": key });
    sessionStorage.removeItem(intentKey(book.id));
    say(box, "ok", "Bought “" + r.title + "” for " + money(r.price) + ". Order number " + r.order_id + ".");
    button.textContent = "Buy another for " + money(book.cost);
  } catch (err) {
    if (err.status === 503 || err.status === 0) {
      // No answer: keep the key, so trying again cannot buy twice.
      say(box, "warn", err.status === 0 ? OFFLINE : "The store is switching over to a backup server, so your purchase is not confirmed yet. Press the button again in a moment: it finishes the same order, never a second one.");
      button.textContent = "Finish purchase";
      button.disabled = false;
      return;
    }
    sessionStorage.removeItem(intentKey(book.id));
    if (err.status === 409) say(box, "bad", "Sorry, “" + book.title + "” is out of stock.");
    else if (err.status === 404) say(box, "bad", "This book is no longer in our store.");
    else say(box, "bad", "The purchase did not go through: " + err.message);
  }
  button.disabled = false;
  try {
    const fresh = await api("GET", "/lookup/" + book.id);
    $("#book-stock").textContent = String(fresh.stock);
    if (fresh.stock === 0) button.textContent = SOLD_OUT;
  } catch (_) { /* the stock shown stays as it was */ }
}

async function route() {
  let h = location.hash.replace(/^#\/?/, "");
  try { h = decodeURIComponent(h); } catch (_) { /* keep it as typed */ }
  const [kind, ...rest] = h.split("/");
  const arg = rest.join("/");
  notice("", "");
  try {
    if (kind === "topic" && arg) await showTopic(arg);
    else if (kind === "search") await showSearch(arg);
    else if (kind === "book" && arg) {
      if (!/^[1-9][0-9]{0,17}$/.test(arg)) throw new StoreError(404, "");
      await showBook(arg);
    } else await showHome();
  } catch (err) {
    if (kind === "book" && (err.status === 404 || err.status === 400)) {
      show("Book not found", el("p", { class: "msg bad", role: "alert", text: "There is no book number " + arg + " in our store." }),
        el("p", {}, el("a", { href: "#/", text: "See all books" })));
    } else if (kind !== "book" && (err.status === 404 || err.status === 400)) {
      show("Page not found", el("p", { class: "msg bad", role: "alert", text: "There is no such page in our store." }),
        el("p", {}, el("a", { href: "#/", text: "See all books" })));
    } else failure("The store could not answer", err);
  }
}

document.addEventListener("DOMContentLoaded", () => {
  $("#search").addEventListener("submit", (e) => {
    e.preventDefault();
    const q = $("#q").value.trim();
    location.hash = q ? "#/search/" + encodeURIComponent(q) : "#/";
  });
  window.addEventListener("hashchange", () => { route().then(() => $("#main").focus({ preventScroll: true })); });
  route();
});
