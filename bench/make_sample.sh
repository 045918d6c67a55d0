#!/usr/bin/env bash
# Regenerates src/evoxtral_stream/data/sample.ogg from sample.txt's sentences
# (needs espeak-ng and sox). One sentence per line below; 1.2 s pause after each.
set -euo pipefail
out=$(cd "$(dirname "$0")/.." && pwd)/src/evoxtral_stream/data
tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
i=0; parts=()
while IFS= read -r line; do
  i=$((i + 1))
  espeak-ng -v en -s 150 -w "$tmp/raw$i.wav" "$line"
  sox "$tmp/raw$i.wav" -r 16000 -c 1 -b 16 "$tmp/p$i.wav" pad 0 1.2
  parts+=("$tmp/p$i.wav")
done <<'TEXT'
Good evening, and welcome to the live captioning demo.
I was thinking maybe we could try that new restaurant downtown.
The weather today is sunny with a light breeze from the west.
Please remember to turn off your phone before the show begins.
Thank you for listening, and have a wonderful night.
TEXT
sox "${parts[@]}" "$tmp/sample.wav" pad 0.5 0
sox "$tmp/sample.wav" -C 4 "$out/sample.ogg"
