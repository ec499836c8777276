"""How requests run: one worker thread per loaded model, the channels between workers and callers, the
pool that loads and unloads models (memory admission, keep_alive), fallback between models, and the
backend factories. Nothing here knows the SDK's request types, the HTTP server or the test kit."""
