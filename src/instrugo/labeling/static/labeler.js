"use strict";
// The labeler page: one task at a time from the JSON API, without page loads. Model text is untrusted:
// it is only ever inserted with textContent (never innerHTML), and the page's CSP forbids inline script.
(() => {
  const FLAGS = JSON.parse(document.body.dataset.flags); // {name: [label, key]}
  const FLAG_BY_KEY = Object.fromEntries(Object.entries(FLAGS).map(([name, [, key]]) => [key, name]));
  const TOKEN_KEY = "instrugo-token";
  const LETTERS = "ABCDEFGHI";
  const $ = (id) => document.getElementById(id);

  // The task being labeled. The ranking is `order` (shown positions, best first) plus `tiedAbove[slot]`;
  // it follows the scores until the labeler edits it (`manual`).
  let state = null;
  let busy = false;

  function el(tag, props = {}, children = []) {
    const node = document.createElement(tag);
    for (const [key, value] of Object.entries(props)) {
      if (key === "text") node.textContent = value;
      else node.setAttribute(key, value);
    }
    node.append(...children); // strings become text nodes
    return node;
  }

  function message(text) { $("message").textContent = text; }

  async function errorText(response) {
    try {
      const detail = (await response.json()).detail;
      return typeof detail === "string" ? detail : detail.map((d) => d.msg).join("; ");
    } catch { return `error ${response.status}`; }
  }

  async function api(method, path, body) {
    const headers = {Authorization: "Bearer " + localStorage.getItem(TOKEN_KEY)};
    if (body !== undefined) headers["Content-Type"] = "application/json";
    const response = await fetch(path, {method, headers, body: body === undefined ? undefined : JSON.stringify(body)});
    if (response.status === 401 || response.status === 403) {
      signOut(response.status === 401 ? "That token was not accepted." : "Admin tokens do not label: open /admin.");
      throw new Error("signed out");
    }
    return response;
  }

  function show(section) {
    for (const id of ["signin", "done", "work"]) $(id).hidden = id !== section;
    $("signout").hidden = section === "signin";
  }

  function signOut(text = "") {
    localStorage.removeItem(TOKEN_KEY);
    state = null;
    $("progress").textContent = "";
    $("signin-error").textContent = text;
    show("signin");
    $("token").focus();
  }

  async function refreshProgress() {
    const response = await api("GET", "/api/me");
    if (!response.ok) return;
    const p = await response.json();
    $("progress").textContent = `${p.name} · ${p.labeled} labeled · ${p.skipped} skipped · ${p.open + p.waiting} to go`;
  }

  async function loadNext() {
    const response = await api("GET", "/api/tasks/next");
    refreshProgress().catch(() => {});
    if (response.status === 204) { state = null; show("done"); return; }
    if (!response.ok) { message(await errorText(response)); return; }
    start(await response.json());
  }

  function start(task) {
    const k = task.responses.length;
    state = {task, order: [], tiedAbove: [], scores: Array(k).fill(null), flags: task.responses.map(() => new Set()),
             manual: false, selected: 0, shownAt: performance.now()};
    rankFromScores();
    $("prompt").textContent = task.prompt;
    $("responses").replaceChildren(...task.responses.map(card));
    $("skip-box").hidden = true;
    message("");
    show("work");
    render();
    window.scrollTo(0, 0);
  }

  function card(text, position) {
    const scores = el("div", {class: "scores", role: "group", "aria-label": "score 1 to 7"});
    for (let s = 1; s <= 7; s++) {
      const button = el("button", {type: "button", class: "score", "data-score": s, text: String(s)});
      button.addEventListener("click", () => setScore(position, s, false));
      scores.append(button);
    }
    const flags = el("div", {class: "flags"});
    for (const [name, [label, key]] of Object.entries(FLAGS)) {
      const box = el("input", {type: "checkbox", "data-flag": name});
      // "click", not "change": it runs before the card's click handler re-renders the boxes from the state.
      box.addEventListener("click", () => toggleFlag(position, name, box.checked));
      flags.append(el("label", {class: "flag"}, [box, ` ${label} `, el("kbd", {text: key})]));
    }
    const node = el("article", {class: "response", "data-pos": position}, [
      el("header", {}, [el("span", {class: "letter", text: LETTERS[position]}), el("span", {class: "rank-badge"})]),
      el("div", {class: "text", text}),
      el("div", {class: "controls"}, [el("span", {text: "Score"}), scores]),
      flags,
    ]);
    node.addEventListener("click", () => { state.selected = position; render(); });
    return node;
  }

  function groups() {
    const out = [];
    state.order.forEach((position, slot) => {
      if (slot > 0 && state.tiedAbove[slot]) out[out.length - 1].push(position);
      else out.push([position]);
    });
    return out;
  }

  function rankFromScores() {
    const score = (position) => state.scores[position] ?? 0; // unscored: last, tied together
    state.order = state.scores.map((_, i) => i).sort((a, b) => score(b) - score(a) || a - b);
    state.tiedAbove = state.order.map((position, slot) => slot > 0 && score(position) === score(state.order[slot - 1]));
    state.manual = false;
  }

  function setScore(position, value, advance) {
    state.scores[position] = value;
    if (!state.manual) rankFromScores();
    if (advance) state.selected = Math.min(position + 1, state.scores.length - 1);
    render();
  }

  function toggleFlag(position, name, on) {
    if (on) state.flags[position].add(name); else state.flags[position].delete(name);
    render();
  }

  function moveSlot(from, to) {
    if (to < 0 || to >= state.order.length || from === to) return;
    const [position] = state.order.splice(from, 1);
    state.order.splice(to, 0, position);
    state.manual = true; // tie marks stay with the slots; the labeler edits them with t
    render();
  }

  function toggleTie() {
    const slot = state.order.indexOf(state.selected);
    if (slot === 0) return;
    state.tiedAbove[slot] = !state.tiedAbove[slot];
    state.manual = true;
    render();
  }

  function render() {
    const ranking = groups();
    const levels = {};
    ranking.forEach((group, level) => group.forEach((p) => { levels[p] = {level, tied: group.length > 1}; }));
    for (const node of $("responses").children) {
      const position = Number(node.dataset.pos);
      node.classList.toggle("selected", position === state.selected);
      const {level, tied} = levels[position];
      node.querySelector(".rank-badge").textContent = `rank ${level + 1}${tied ? " (tie)" : ""}`;
      for (const button of node.querySelectorAll(".score")) {
        button.setAttribute("aria-pressed", String(Number(button.dataset.score) === state.scores[position]));
      }
      for (const box of node.querySelectorAll("input[data-flag]")) box.checked = state.flags[position].has(box.dataset.flag);
    }
    $("ranking").replaceChildren(...state.order.map((position, slot) => {
      const row = el("li", {draggable: "true", "data-slot": slot, "data-pos": position,
                            class: (slot > 0 && state.tiedAbove[slot] ? "tied " : "") + (position === state.selected ? "selected" : "")},
                     [el("span", {class: "letter", text: LETTERS[position]}),
                      el("span", {class: "snippet", text: state.task.responses[position].slice(0, 80)})]);
      row.addEventListener("dragstart", (e) => e.dataTransfer.setData("text/plain", String(slot)));
      row.addEventListener("dragover", (e) => e.preventDefault());
      row.addEventListener("drop", (e) => { e.preventDefault(); moveSlot(Number(e.dataTransfer.getData("text/plain")), slot); });
      row.addEventListener("click", () => { state.selected = position; render(); });
      return row;
    }));
  }

  async function submit() {
    if (!state || busy) return;
    const missing = state.scores.findIndex((s) => s === null);
    if (missing >= 0) { state.selected = missing; render(); message(`Score response ${LETTERS[missing]} first.`); return; }
    const ranking = groups();
    if (ranking.length === 1) { message("Everything is tied: rank the responses, or skip the task."); return; }
    busy = true;
    message("Saving…");
    try {
      const seconds = Math.round((performance.now() - state.shownAt) / 100) / 10;
      const response = await api("POST", `/api/tasks/${state.task.id}/label`,
                                 {ranking, scores: state.scores, flags: state.flags.map((f) => [...f]), seconds});
      if (!response.ok) { message(await errorText(response)); return; }
      await loadNext();
      if (state) message("Saved. Next task.");
    } catch (error) {
      if (error.message !== "signed out") message("Not saved (connection problem): press Enter to try again.");
    } finally { busy = false; }
  }

  async function skip(reason) {
    if (!state || busy) return;
    busy = true;
    try {
      const response = await api("POST", `/api/tasks/${state.task.id}/skip`, {reason});
      if (!response.ok) { message(await errorText(response)); return; }
      await loadNext();
      if (state) message("Skipped. Next task.");
    } catch (error) {
      if (error.message !== "signed out") message("Not skipped (connection problem): try again.");
    } finally { busy = false; }
  }

  function openSkip() {
    $("skip-box").hidden = false;
    $("skip-reason").focus();
  }

  document.addEventListener("keydown", (e) => {
    if (!state || $("work").hidden || e.ctrlKey || e.metaKey || e.altKey) return;
    if (e.target.matches("input[type=text], input[type=password], input:not([type]), textarea")) {
      if (e.key === "Escape") { $("skip-box").hidden = true; e.target.blur(); }
      return;
    }
    const last = state.scores.length - 1;
    const key = e.key;
    if (key >= "1" && key <= "7") setScore(state.selected, Number(key), true);
    else if (key === "j") { state.selected = Math.min(state.selected + 1, last); render(); }
    else if (key === "k") { state.selected = Math.max(state.selected - 1, 0); render(); }
    else if (key === "u" || key === "d") {
      const slot = state.order.indexOf(state.selected);
      moveSlot(slot, key === "u" ? slot - 1 : slot + 1);
    } else if (key === "t") toggleTie();
    else if (key === "r") { rankFromScores(); render(); }
    else if (key in FLAG_BY_KEY) {
      const name = FLAG_BY_KEY[key];
      toggleFlag(state.selected, name, !state.flags[state.selected].has(name));
    } else if (key === "Enter") submit();
    else if (key === "x") openSkip();
    else if (key === "?") $("help").open = !$("help").open;
    else return;
    e.preventDefault(); // e.g. Enter on a focused button must not also click it
    if (key === "j" || key === "k") document.querySelector(".response.selected").scrollIntoView({block: "nearest"});
  });

  $("signin-form").addEventListener("submit", (e) => {
    e.preventDefault();
    localStorage.setItem(TOKEN_KEY, $("token").value.trim());
    $("token").value = "";
    $("signin-error").textContent = "";
    loadNext().catch(() => {});
  });
  $("signout").addEventListener("click", () => signOut());
  $("submit").addEventListener("click", submit);
  $("skip").addEventListener("click", openSkip);
  $("skip-box").addEventListener("submit", (e) => {
    e.preventDefault();
    const reason = $("skip-reason").value.trim();
    if (!reason) { message("A skip needs a reason."); return; }
    $("skip-reason").value = "";
    skip(reason);
  });
  $("check-again").addEventListener("click", () => loadNext().catch(() => {}));
  $("flag-keys").replaceChildren(...Object.values(FLAGS).flatMap(([, key]) => [el("kbd", {text: key}), " "]));

  if (localStorage.getItem(TOKEN_KEY)) loadNext().catch(() => {});
  else signOut();
})();
