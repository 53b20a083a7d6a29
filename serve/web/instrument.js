// The lmdm instrument: one WebSocket session (/v1/stream), weighted prompts, play/pause, a level meter and
// counters. `window.lmdm` exposes the state and actions (the browser test drives the page through it and the DOM).
const $ = (id) => document.getElementById(id);
const HEADER_BYTES = 32;

const state = {
  connected: false, started: null, closed: null, error: null,
  blocks: 0, expectedBlock: 0, gaps: 0, underruns: 0, played: 0, buffered: 0, level: 0,
  paused: false, promptsSet: [], latencies: [],
};
let socket = null, context = null, player = null, pending = [], changes = [], debounce = null;

function status(text, error = false) {
  $("status").textContent = text;
  $("status").className = error ? "error" : "";
}

function addPrompt(text = "", weight = 1) {
  const row = document.createElement("div");
  row.className = "prompt";
  row.innerHTML = `<input type="text" placeholder="a prompt, e.g. Bach chorale, for organ">
    <input type="range" min="0" max="1" step="0.01"><span class="w"></span><button title="remove">×</button>`;
  const [text_, slider, shown, remove] = [row.children[0], row.children[1], row.children[2], row.children[3]];
  text_.value = text;
  slider.value = weight;
  shown.textContent = Number(weight).toFixed(2);
  slider.addEventListener("input", () => { shown.textContent = Number(slider.value).toFixed(2); edited(); });
  text_.addEventListener("change", edited);
  remove.addEventListener("click", () => { row.remove(); edited(); });
  $("prompts").appendChild(row);
}

function readPrompts() {
  return [...document.querySelectorAll("#prompts .prompt")]
    .map((row) => ({ text: row.children[0].value.trim(), weight: Number(row.children[1].value) }))
    .filter((p) => p.text && p.weight > 0);
}

function edited() {
  if (!$("live").checked || !state.started || !state.connected) return;
  clearTimeout(debounce);
  debounce = setTimeout(() => setPrompts(), 250);  // a slider drag is one change, within the server's rate limit
}

function send(message) {
  if (socket && socket.readyState === WebSocket.OPEN) socket.send(JSON.stringify(message));
}

function setPrompts(prompts = readPrompts()) {
  if (!prompts.length) { status("Give at least one prompt a weight above 0.", true); return; }
  changes.push({ sent: performance.now(), target: null });
  send({ type: "set_prompts", prompts });
}

async function openPlayer(started) {
  context = new AudioContext({ sampleRate: started.sample_rate, latencyHint: "interactive" });
  await context.audioWorklet.addModule("/web/worklet.js");
  player = new AudioWorkletNode(context, "lmdm-player", {
    numberOfOutputs: 1, outputChannelCount: [started.channels], processorOptions: { channels: started.channels },
  });
  player.port.onmessage = (event) => {
    const m = event.data;
    state.played = m.played; state.underruns = m.underruns; state.level = m.level; state.buffered = m.buffered;
    for (const change of changes) {
      if (change.target !== null && change.latency === undefined && m.played >= change.target) {
        change.latency = performance.now() - change.sent;
        state.latencies.push(change.latency);
      }
    }
    render();
  };
  player.connect(context.destination);
  await context.resume();
  for (const message of pending) player.port.postMessage(message.payload, message.transfer);
  pending = [];
}

function onAudio(buffer) {
  const view = new DataView(buffer);
  const magic = String.fromCharCode(view.getUint8(0), view.getUint8(1), view.getUint8(2), view.getUint8(3));
  if (magic !== "LMDA") { status(`not an LMDM audio frame (${magic})`, true); return; }
  const channels = view.getUint8(5), block = view.getUint32(12, true), frames = view.getUint32(20, true);
  const last = (view.getUint16(6, true) & 1) === 1;
  if (!last) {
    if (block !== state.expectedBlock) state.gaps += 1;
    state.expectedBlock = block + 1;
    state.blocks += 1;
    send({ type: "ack", block });
  }
  const pcm = new Int16Array(buffer, HEADER_BYTES, frames * channels);
  const data = [];
  for (let c = 0; c < channels; c++) {
    const channel = new Float32Array(frames);
    for (let i = 0; i < frames; i++) channel[i] = pcm[i * channels + c] / 32767;
    data.push(channel);
  }
  const message = { payload: { type: "audio", channels: data }, transfer: data.map((d) => d.buffer) };
  if (player) player.port.postMessage(message.payload, message.transfer);
  else pending.push(message);
  render();
}

function onMessage(message) {
  if (message.type === "started") {
    state.started = message;
    status(`Streaming: session ${message.session}, ${message.sample_rate} Hz, ${(message.block_samples / message.sample_rate).toFixed(2)} s blocks.`);
    openPlayer(message).catch((e) => { state.error = String(e); status(`Audio output failed: ${e}`, true); });
  } else if (message.type === "prompts_set") {
    state.promptsSet.push(message);
    const change = changes.find((c) => c.target === null);
    if (change) change.target = message.from_block * state.started.block_samples;
  } else if (message.type === "error") {
    state.error = message.message;
    status(`Server: ${message.message}`, true);
    if (message.to === "set_prompts") {  // that change was refused: it will never be heard
      const refused = changes.findIndex((c) => c.target === null);
      if (refused >= 0) changes.splice(refused, 1);
    }
  }
}

function teardown() {
  // the previous session's player and audio context go (a browser allows a page only a few contexts)
  if (player) { player.port.onmessage = null; player.disconnect(); player = null; }
  if (context) { context.close(); context = null; }
  pending = [];
  changes = [];
  state.started = null;
  state.paused = false;
  $("pause").textContent = "Pause";
}

function start() {
  teardown();
  const prompts = readPrompts();
  const url = new URL("/v1/stream", location.href);
  url.protocol = location.protocol === "https:" ? "wss:" : "ws:";
  const token = $("token").value || new URLSearchParams(location.search).get("token");
  if (token) url.searchParams.set("token", token);
  Object.assign(state, {
    blocks: 0, expectedBlock: 0, gaps: 0, closed: null, error: null, promptsSet: [], latencies: [],
    played: 0, underruns: 0, buffered: 0, level: 0,
  });
  socket = new WebSocket(url);
  socket.binaryType = "arraybuffer";
  socket.onopen = () => {
    state.connected = true;
    const start = { type: "start", prompts, seed: Number($("seed").value || 0) };
    if ($("steps").value) start.steps = Number($("steps").value);
    send(start);
  };
  socket.onmessage = (event) => (typeof event.data === "string" ? onMessage(JSON.parse(event.data)) : onAudio(event.data));
  socket.onclose = (event) => {
    state.connected = false;  // no more live edits are sent; the player finishes what it holds
    state.closed = { code: event.code, reason: event.reason };
    if (event.code !== 1000) status(`Closed (${event.code}): ${event.reason || "connection lost"}`, true);
    else status("Stopped.");
    buttons();
  };
  buttons(true);
}

function pause() {
  state.paused = !state.paused;
  send({ type: state.paused ? "pause" : "play" });
  if (player) player.port.postMessage({ type: state.paused ? "pause" : "play" });
  $("pause").textContent = state.paused ? "Play" : "Pause";
}

function stop() {
  send({ type: "stop" });
}

function buttons(open = state.connected) {
  $("start").disabled = open;
  $("pause").disabled = !open;
  $("stop").disabled = !open;
  $("apply").disabled = !open;
}

function render() {
  $("c-blocks").textContent = state.blocks;
  $("c-gaps").textContent = state.gaps;
  $("c-underruns").textContent = state.underruns;
  const rate = state.started ? state.started.sample_rate : 1;
  $("c-played").textContent = (state.played / rate).toFixed(1);
  $("c-buffered").textContent = (state.buffered / rate).toFixed(2);
  if (state.latencies.length) $("c-latency").textContent = state.latencies[state.latencies.length - 1].toFixed(0);
  $("level").style.width = `${Math.min(100, Math.sqrt(state.level) * 140).toFixed(1)}%`;
}

$("add").addEventListener("click", () => addPrompt());
$("apply").addEventListener("click", () => setPrompts());
$("start").addEventListener("click", start);
$("pause").addEventListener("click", pause);
$("stop").addEventListener("click", stop);
const params = new URLSearchParams(location.search);
if (params.get("token")) $("token").value = params.get("token");
addPrompt(params.get("prompt") || "Bach chorale, for organ, moderato", 1);
addPrompt("Monteverdi madrigal, for strings", 0);

window.lmdm = { state, start, stop, pause, setPrompts, addPrompt, readPrompts };
