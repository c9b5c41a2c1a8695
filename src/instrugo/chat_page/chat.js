// The chat page of `instrugo serve`: keeps the conversation in the page and streams each reply from
// POST /v1/chat/completions. Model text is untrusted: it is only ever inserted as textContent.
"use strict";

const transcript = document.getElementById("transcript");
const form = document.getElementById("composer");
const input = document.getElementById("message");
const sendButton = document.getElementById("send");
let messages = [];
let inFlight = null;  // the AbortController of the reply being streamed

function addTurn(kind, text) {
  const turn = document.createElement("div");
  turn.className = "turn " + kind;
  turn.textContent = text;
  transcript.appendChild(turn);
  turn.scrollIntoView({block: "end"});
  return turn;
}

function headers() {
  const key = document.getElementById("api-key").value;
  return Object.assign({"Content-Type": "application/json"}, key ? {"Authorization": "Bearer " + key} : {});
}

async function send(text) {
  messages.push({role: "user", content: text});
  addTurn("user", text);
  const turn = addTurn("assistant", "");
  sendButton.disabled = true;
  const controller = new AbortController();
  inFlight = controller;
  let reply = "", finish = null, complete = false;
  try {
    const response = await fetch("/v1/chat/completions", {
      method: "POST", headers: headers(), signal: controller.signal,
      body: JSON.stringify({messages: messages, stream: true,
                            temperature: Number(document.getElementById("temperature").value),
                            max_tokens: Number(document.getElementById("max-tokens").value)}),
    });
    if (!response.ok) {
      const body = await response.json().catch(() => ({}));
      throw new Error((body.error && body.error.message) || response.statusText);
    }
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let buffered = "";
    for (;;) {
      const {value, done} = await reader.read();
      if (done) break;
      buffered += decoder.decode(value, {stream: true});
      const events = buffered.split("\n\n");
      buffered = events.pop();
      for (const event of events) {
        const data = event.replace(/^data: /, "");
        if (data === "[DONE]") { complete = true; continue; }
        const chunk = JSON.parse(data);
        if (chunk.error) throw new Error(chunk.error.message);
        for (const choice of chunk.choices) {
          if (choice.delta && choice.delta.content) reply += choice.delta.content;
          if (choice.finish_reason) finish = choice.finish_reason;
        }
        turn.textContent = reply;
      }
    }
    if (!complete) throw new Error("the reply was cut off (connection lost)");
    messages.push({role: "assistant", content: reply});
    if (finish === "length") addTurn("note", "(cut at max tokens)");
  } catch (error) {
    if (controller.signal.aborted) return;  // "New chat" while it streamed: that conversation is gone
    messages.pop();
    addTurn("note", "error: " + error.message + " (that message is not part of the conversation)");
  } finally {
    if (inFlight === controller) {
      inFlight = null;
      sendButton.disabled = false;
    }
  }
}

form.addEventListener("submit", (event) => {
  event.preventDefault();
  const text = input.value.trim();
  if (!text || sendButton.disabled) return;
  input.value = "";
  send(text);
});
input.addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey) {
    event.preventDefault();
    form.requestSubmit();
  }
});
document.getElementById("reset").addEventListener("click", () => {
  if (inFlight) inFlight.abort();
  inFlight = null;
  sendButton.disabled = false;
  messages = [];
  transcript.replaceChildren();
});
fetch("/health").then((r) => r.json()).then((health) => {
  document.getElementById("policy").textContent = "policy: " + health.policy;
  const maxTokens = document.getElementById("max-tokens");  // the server refuses more than its --max-new-tokens
  maxTokens.max = health.max_new_tokens;
  maxTokens.value = Math.min(Number(maxTokens.value) || health.max_new_tokens, health.max_new_tokens);
}).catch(() => {
  document.getElementById("policy").textContent = "server unreachable";
});
