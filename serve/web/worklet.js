// The instrument's player: an AudioWorklet that plays the PCM blocks the page posts to it, in order, and reports
// what it played (samples), whether it ran dry (underruns) and the output level.
class LmdmPlayer extends AudioWorkletProcessor {
  constructor(options) {
    super();
    this.channels = options.processorOptions.channels;
    this.queue = [];   // [{data: [Float32Array per channel], offset}]
    this.played = 0;   // samples played (per channel)
    this.underruns = 0;
    this.started = false;
    this.dry = false;
    this.paused = false;
    this.sumSquares = 0;
    this.counted = 0;
    this.quanta = 0;
    this.port.onmessage = (event) => {
      const message = event.data;
      if (message.type === "audio") this.queue.push({ data: message.channels, offset: 0 });
      else if (message.type === "pause") this.paused = true;
      else if (message.type === "play") this.paused = false;
      else if (message.type === "clear") { this.queue = []; this.started = false; }
    };
  }

  buffered() {
    let n = 0;
    for (const chunk of this.queue) n += chunk.data[0].length - chunk.offset;
    return n;
  }

  process(inputs, outputs) {
    const out = outputs[0];
    const frames = out[0].length;
    if (!this.paused) {
      let written = 0;
      while (written < frames && this.queue.length) {
        const chunk = this.queue[0];
        const n = Math.min(frames - written, chunk.data[0].length - chunk.offset);
        for (let c = 0; c < out.length; c++) {
          const source = chunk.data[Math.min(c, chunk.data.length - 1)];
          out[c].set(source.subarray(chunk.offset, chunk.offset + n), written);
        }
        for (let i = 0; i < n; i++) { const v = out[0][written + i]; this.sumSquares += v * v; }
        this.counted += n;
        chunk.offset += n;
        written += n;
        if (chunk.offset >= chunk.data[0].length) this.queue.shift();
      }
      if (written > 0) this.started = true;
      this.played += written;
      const dry = this.started && written < frames;
      if (dry && !this.dry) this.underruns += 1;  // count each time it runs dry, not every quantum
      this.dry = dry;
    }
    if (++this.quanta % 8 === 0) {
      const rms = this.counted ? Math.sqrt(this.sumSquares / this.counted) : 0;
      this.port.postMessage({ played: this.played, underruns: this.underruns, level: rms, buffered: this.buffered() });
      this.sumSquares = 0;
      this.counted = 0;
    }
    return true;
  }
}

registerProcessor("lmdm-player", LmdmPlayer);
