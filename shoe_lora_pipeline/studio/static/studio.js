// The review studio's behaviour: decisions by click and keyboard, approve-top-N, the specs table, run
// following. No inline script anywhere (the Content-Security-Policy forbids it); text goes in via
// textContent only, so nothing from a CSV can become markup.
"use strict";

const csrf = () => document.querySelector('meta[name="csrf-token"]').content;

async function post(url, body) {
  const resp = await fetch(url, {
    method: "POST",
    headers: {"Content-Type": "application/json", "X-CSRF-Token": csrf()},
    body: JSON.stringify(body),
  });
  let data;
  try { data = await resp.json(); } catch (e) { data = {ok: false, error: `${resp.status} ${resp.statusText}`}; }
  if (!resp.ok || !data.ok) throw new Error(data.error || `${resp.status}`);
  return data;
}

function say(text, isError) {
  const box = document.getElementById("message");
  if (!box) return;
  box.textContent = text;
  box.className = isError ? "message error" : "message";
}

function showDecision(card, decision, note) {
  card.classList.remove("decision-approve", "decision-reject", "decision-none");
  card.classList.add(`decision-${decision || "none"}`);
  card.querySelector(".decision").textContent = decision || "no decision";
  if (note !== undefined) card.querySelector(".note").value = note;
}

async function decide(card, decision) {
  const note = card.querySelector(".note").value;
  try {
    const saved = await post("/api/decision", {
      sku: card.dataset.sku, seed: card.dataset.seed, image_sha256: card.dataset.sha, decision, note,
    });
    showDecision(card, saved.decision, saved.note);
    say(`${card.dataset.sku} / ${saved.file}: ${saved.decision || "no decision"} (saved to reviews.csv)`);
  } catch (err) {
    say(err.message, true);
  }
}

function currentDecision(card) {
  if (card.classList.contains("decision-approve")) return "approve";
  if (card.classList.contains("decision-reject")) return "reject";
  return "";
}

function cards() { return Array.from(document.querySelectorAll("figure.candidate")); }

function move(card, step) {
  const all = cards();
  const next = all[all.indexOf(card) + step];
  if (next) { next.focus(); next.scrollIntoView({block: "nearest"}); }
}

function moveSku(card, step) {
  const sections = Array.from(document.querySelectorAll("section.sku"));
  const here = sections.indexOf(card ? card.closest("section.sku") : null);
  const target = sections[here + step];
  const first = target && target.querySelector("figure.candidate");
  if (first) { first.focus(); first.scrollIntoView({block: "nearest"}); }
}

function setupReview() {
  for (const card of cards()) {
    card.querySelector(".approve").addEventListener("click", () => decide(card, "approve"));
    card.querySelector(".reject").addEventListener("click", () => decide(card, "reject"));
    card.querySelector(".note").addEventListener("keydown", (ev) => {
      if (ev.key === "Enter") { ev.preventDefault(); decide(card, currentDecision(card)); card.focus(); }
      if (ev.key === "Escape") { card.focus(); }
    });
  }
  for (const button of document.querySelectorAll("button.approve-top")) {
    button.addEventListener("click", async () => {
      const section = button.closest("section.sku");
      const n = section.querySelector(".top-n").value;
      try {
        const data = await post("/api/approve-top", {sku: section.dataset.sku, n});
        for (const row of data.approved) {
          for (const card of section.querySelectorAll("figure.candidate")) {
            if (card.dataset.seed === row.seed && card.dataset.sha === row.image_sha256) showDecision(card, "approve");
          }
        }
        say(`${section.dataset.sku}: approved ${data.approved.length} (saved to reviews.csv)`);
      } catch (err) { say(err.message, true); }
    });
  }
  document.addEventListener("keydown", (ev) => {
    if (ev.ctrlKey || ev.metaKey || ev.altKey) return;
    const target = ev.target;
    if (target instanceof HTMLInputElement || target instanceof HTMLTextAreaElement) return;
    const card = target.closest ? target.closest("figure.candidate") : null;
    const all = cards();
    if (!all.length) return;
    if (!card) {
      if (["ArrowRight", "ArrowDown", "ArrowLeft", "ArrowUp"].includes(ev.key)) { all[0].focus(); ev.preventDefault(); }
      return;
    }
    const actions = {
      ArrowRight: () => move(card, 1), ArrowLeft: () => move(card, -1),
      ArrowDown: () => moveSku(card, 1), ArrowUp: () => moveSku(card, -1),
      a: () => decide(card, "approve"), r: () => decide(card, "reject"),
      n: () => card.querySelector(".note").focus(),
    };
    const act = actions[ev.key];
    if (act) { ev.preventDefault(); act(); }
  });
}

function setupSpecs() {
  const form = document.getElementById("sheet-form");
  if (!form) return;
  const table = document.getElementById("sheet");
  const columns = Array.from(table.querySelectorAll("thead th")).slice(1, -1).map((th) => th.textContent);
  document.getElementById("add-row").addEventListener("click", () => {
    const tr = document.createElement("tr");
    const line = document.createElement("td");
    line.className = "line";
    tr.appendChild(line);
    for (const name of columns) {
      const td = document.createElement("td");
      const input = document.createElement("input");
      input.setAttribute("aria-label", name);
      td.appendChild(input);
      tr.appendChild(td);
    }
    tr.appendChild(document.createElement("td"));
    table.tBodies[0].appendChild(tr);
    tr.querySelector("input").focus();
  });
  const quote = (v) => (/[",\n\r]/.test(v) || v !== v.trim() ? `"${v.replace(/"/g, '""')}"` : v);
  form.addEventListener("submit", () => {
    const lines = [columns.map(quote).join(",")];
    for (const tr of table.tBodies[0].rows) {
      const values = Array.from(tr.querySelectorAll("input")).map((i) => i.value);
      if (values.some((v) => v.trim())) lines.push(values.map(quote).join(","));  // an emptied row is dropped
    }
    document.getElementById("sheet-csv").value = lines.join("\n") + "\n";
  });
}

function setupRun() {
  const box = document.getElementById("run");
  if (!box || box.dataset.terminal === "yes") return;
  const poll = async () => {
    try {
      const resp = await fetch(`/api/runs/${encodeURIComponent(box.dataset.runId)}`);
      const info = await resp.json();
      box.querySelector(".run-status").textContent = info.status;
      if (info.terminal) { window.location.reload(); return; }
    } catch (err) { /* the next poll tries again */ }
    setTimeout(poll, 1000);
  };
  setTimeout(poll, 1000);
}

document.addEventListener("DOMContentLoaded", () => { setupReview(); setupSpecs(); setupRun(); });
