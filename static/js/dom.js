// Small DOM and storage helpers shared by the pages (chat, dashboard, editing).
//
//   import { $, h, store } from "./dom.js";
//   $("id")                      document.getElementById
//   h("li", "cls", "text")       an element; text goes in as textContent, never as HTML
//   store.get(key, fallback)     JSON from localStorage, or fallback (private mode, bad JSON)
//   store.set(key, value)        JSON into localStorage; null/undefined removes the key

export const $ = (id) => document.getElementById(id);

export function h(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined && text !== null) node.textContent = text;
  return node;
}

export const store = {
  get(key, fallback) {
    try {
      const raw = localStorage.getItem(key);
      return raw === null ? fallback : JSON.parse(raw);
    } catch (e) {
      return fallback;
    }
  },
  set(key, value) {
    try {
      if (value === null || value === undefined) localStorage.removeItem(key);
      else localStorage.setItem(key, JSON.stringify(value));
    } catch (e) {
      /* private mode or full: the page still works, it just forgets */
    }
  },
};
