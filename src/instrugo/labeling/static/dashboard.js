"use strict";
// The admin dashboard: progress, throughput, agreement; labelers, import and export. Everything comes
// from the admin API; text (labeler names included) is inserted with textContent only.
(() => {
  const TOKEN_KEY = "instrugo-admin-token";
  const REFRESH_MS = 15000;
  const $ = (id) => document.getElementById(id);
  let timer = null;

  function el(tag, props = {}, children = []) {
    const node = document.createElement(tag);
    for (const [key, value] of Object.entries(props)) {
      if (key === "text") node.textContent = value;
      else node.setAttribute(key, value);
    }
    node.append(...children);
    return node;
  }

  const percent = (x) => (x === null || x === undefined ? "–" : `${(100 * x).toFixed(1)}%`);

  async function api(method, path, body) {
    const headers = {Authorization: "Bearer " + localStorage.getItem(TOKEN_KEY)};
    if (body !== undefined) headers["Content-Type"] = "application/json";
    const response = await fetch(path, {method, headers, body: body === undefined ? undefined : JSON.stringify(body)});
    if (response.status === 401 || response.status === 403) {
      signOut(response.status === 401 ? "That token was not accepted." : "That is a labeler token, not an admin token.");
      throw new Error("signed out");
    }
    return response;
  }

  async function errorText(response) {
    try {
      const detail = (await response.json()).detail;
      return typeof detail === "string" ? detail : detail.map((d) => d.msg).join("; ");
    } catch { return `error ${response.status}`; }
  }

  function signOut(text = "") {
    localStorage.removeItem(TOKEN_KEY);
    clearInterval(timer);
    $("dash").hidden = true;
    $("signout").hidden = true;
    $("signin").hidden = false;
    $("signin-error").textContent = text;
  }

  function card(label, value, note = "") {
    return el("div", {class: "card"}, [el("div", {class: "value", text: value}), el("div", {text: label}),
                                       el("small", {text: note})]);
  }

  function render(d) {
    const inter = d.inter_labeler;
    $("cards").replaceChildren(
      card("tasks done", `${d.tasks_done} / ${d.tasks}`, `${d.overlapping_tasks} with overlap`),
      card("labels", `${d.labels} / ${d.labels_wanted}`, `${d.skipped} skipped, ${d.open} open`),
      card("last 24 hours", String(d.labels_per_hour.reduce((a, b) => a + b, 0)), `${d.labels_per_hour[23]} in the last hour`),
      card("inter-labeler agreement", percent(inter.agreement), `${inter.pairs} pairs on ${inter.tasks} tasks`));
    const peak = Math.max(1, ...d.labels_per_hour);
    $("hourly").replaceChildren(...d.labels_per_hour.map((n, i) => {
      const bar = el("div", {class: "hour", title: `${23 - i} h ago: ${n}`});
      bar.style.height = `${(100 * n) / peak}%`; // CSSOM, allowed under the CSP
      return bar;
    }));
    $("labelers").tBodies[0].replaceChildren(...d.labelers.map((p) => {
      const action = el("td");
      if (!p.revoked) {
        const button = el("button", {type: "button", text: "Revoke"});
        button.addEventListener("click", () => revoke(p.name));
        action.append(button);
      }
      return el("tr", {class: p.revoked ? "revoked" : ""}, [
        el("td", {text: p.name}), el("td", {text: p.revoked ? "revoked" : p.role}), el("td", {text: p.labeled}),
        el("td", {text: p.skipped}), el("td", {text: p.open}), el("td", {text: p.last_hour}),
        el("td", {text: p.median_seconds === null ? "–" : p.median_seconds.toFixed(1)}),
        el("td", {text: `${percent(p.agreement_with_majority)} (${p.majority_pairs} pairs)`}), action]);
    }));
    $("pairs").tBodies[0].replaceChildren(...inter.by_pair.map((row) => el("tr", {}, [
      el("td", {text: row.labelers.join(" · ")}), el("td", {text: percent(row.agreement)}), el("td", {text: row.pairs})])));
    $("updated").textContent = `updated ${new Date().toLocaleTimeString()}`;
  }

  async function refresh() {
    const response = await api("GET", "/api/admin/dashboard");
    if (!response.ok) { $("updated").textContent = await errorText(response); return; }
    render(await response.json());
    $("signin").hidden = true;
    $("dash").hidden = false;
    $("signout").hidden = false;
  }

  async function revoke(name) {
    if (!confirm(`Revoke ${name}? Their unfinished tasks go back to the pool.`)) return;
    await api("POST", `/api/admin/labelers/${encodeURIComponent(name)}/revoke`);
    refresh();
  }

  function start() {
    refresh().catch(() => {});
    clearInterval(timer);
    timer = setInterval(() => refresh().catch(() => {}), REFRESH_MS);
  }

  $("signin-form").addEventListener("submit", (e) => {
    e.preventDefault();
    localStorage.setItem(TOKEN_KEY, $("token").value.trim());
    $("token").value = "";
    start();
  });
  $("signout").addEventListener("click", () => signOut());

  $("add-form").addEventListener("submit", async (e) => {
    e.preventDefault();
    const response = await api("POST", "/api/admin/labelers", {name: $("add-name").value.trim(), admin: $("add-admin").checked});
    if (!response.ok) { $("add-result").textContent = await errorText(response); return; }
    const {name, token} = await response.json();
    $("add-result").replaceChildren(`Token for ${name} (shown once): `, el("code", {text: token}));
    $("add-name").value = "";
    refresh();
  });

  $("import-form").addEventListener("submit", async (e) => {
    e.preventDefault();
    const text = await $("import-file").files[0].text();
    let tasks;
    try {
      tasks = text.split("\n").filter((line) => line.trim()).map((line) => JSON.parse(line));
    } catch (error) { $("import-result").textContent = `not JSONL: ${error.message}`; return; }
    const response = await api("POST", "/api/admin/tasks",
                               {tasks, overlap: Number($("import-overlap").value), copies: Number($("import-copies").value)});
    const result = await (response.ok ? response.json() : errorText(response));
    $("import-result").textContent = response.ok
      ? `added ${result.added} (${result.overlapping} with overlap), ${result.already_present} already present`
      : result;
    refresh();
  });

  $("export").addEventListener("click", async () => {
    const response = await api("GET", "/api/admin/export");
    const link = el("a", {href: URL.createObjectURL(await response.blob()), download: "labels.jsonl"});
    link.click();
    URL.revokeObjectURL(link.href);
  });

  if (localStorage.getItem(TOKEN_KEY)) start();
  else signOut();
})();
