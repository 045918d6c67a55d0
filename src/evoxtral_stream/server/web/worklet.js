// AudioWorklet processor: mono float32 render quanta -> PCM16 messages.
//
// The page connects the microphone to this node with channelCount 1, so
// inputs[0][0] is the downmixed signal at the AudioContext's sampleRate.
// Every `chunkFrames` frames it posts one ArrayBuffer of signed 16-bit
// samples (platform order, little-endian on every browser platform) to the
// page, which sends it as one binary /v1/ingest message.

class Pcm16Capture extends AudioWorkletProcessor {
  constructor(options) {
    super();
    this.frames = options?.processorOptions?.chunkFrames || 2048;
    this.buf = new Int16Array(this.frames);
    this.n = 0;
  }

  process(inputs) {
    const channel = inputs[0]?.[0];
    if (channel) {
      for (let i = 0; i < channel.length; i++) {
        const s = Math.max(-1, Math.min(1, channel[i]));
        this.buf[this.n++] = s < 0 ? s * 0x8000 : s * 0x7fff;
        if (this.n === this.frames) {
          this.port.postMessage(this.buf.buffer, [this.buf.buffer]);
          this.buf = new Int16Array(this.frames);
          this.n = 0;
        }
      }
    }
    return true;  // keep running until the page disconnects the node
  }
}

registerProcessor("pcm16-capture", Pcm16Capture);
