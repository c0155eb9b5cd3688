#!/usr/bin/env bash
# The API with curl. Start a server first: scripts/serve
#   examples/curl.sh [http://127.0.0.1:8000]
# Set OPENAI_API_KEY if the server runs with --api-key.
set -euo pipefail
BASE=${1:-http://127.0.0.1:8000}
AUTH=()
if [ -n "${OPENAI_API_KEY:-}" ]; then AUTH=(-H "Authorization: Bearer $OPENAI_API_KEY"); fi

echo "== GET /v1/models"
curl -sS "${AUTH[@]}" "$BASE/v1/models"; echo

echo "== POST /v1/chat/completions (one JSON body, with timings)"
curl -sS "${AUTH[@]}" "$BASE/v1/chat/completions" -H 'Content-Type: application/json' -d '{
  "messages": [{"role": "user", "content": "What is the capital of France?"}],
  "max_tokens": 32, "temperature": 0
}'; echo

echo "== POST /v1/chat/completions, streamed (SSE; the usage chunk comes last)"
curl -sS -N "${AUTH[@]}" "$BASE/v1/chat/completions" -H 'Content-Type: application/json' -d '{
  "messages": [{"role": "user", "content": "Write a haiku about the sea."}],
  "max_tokens": 48, "stream": true, "stream_options": {"include_usage": true}
}'

echo "== POST /v1/completions with logprobs"
curl -sS "${AUTH[@]}" "$BASE/v1/completions" -H 'Content-Type: application/json' -d '{
  "prompt": "The quick brown fox", "max_tokens": 8, "temperature": 0, "logprobs": 2
}'; echo

echo "== POST /tokenize"
curl -sS "${AUTH[@]}" "$BASE/tokenize" -H 'Content-Type: application/json' -d '{"prompt": "Hello world"}'; echo

echo "== GET /metrics (first lines)"
curl -sS "$BASE/metrics" | grep -v '^#' | head -12
