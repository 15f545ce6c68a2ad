"""An OpenAI-compatible HTTP server over the continuous-batching engine (`python -m
grok.serve`). Kept apart as JetStream keeps them: `protocol` (the wire format), `worker`
(the device thread that owns the scheduler), `plan` (what the device loop does each step,
shared across processes), `app` (the HTTP endpoints), `metrics` and `chat`."""
