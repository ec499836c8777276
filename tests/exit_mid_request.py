"""Run by tests/test_exit.py: start a request in one modality, then exit in the middle of it without
closing anything (the client, its engine, the stream). The process must still exit 0 (issue 22 item 16).

    python tests/exit_mid_request.py chat|embeddings|tts|stt [speech.wav]
"""
import sys
import threading
import time

from polargrid_local import PolarGridSync

mode = sys.argv[1]
pg = PolarGridSync()
if mode == "chat":        # a stream read once, then left open
    stream = pg.chat_completion_stream({"model": "smollm2-135m-instruct", "max_tokens": 512,
                                        "messages": [{"role": "user", "content": "Tell a very long story."}]})
    next(iter(stream))
elif mode == "embeddings":   # a request still running on another thread
    threading.Thread(target=lambda: pg.embeddings({"model": "smollm2-135m-embed", "input": ["word " * 20] * 256}),
                     daemon=True).start()
    time.sleep(1.0)
elif mode == "tts":       # one sentence of many read, the rest left unread
    stream = pg.text_to_speech_stream({"model": "tts-1", "voice": "alloy", "response_format": "wav",
                                       "input": "One sentence here. " * 40})
    next(iter(stream))
elif mode == "stt":       # a transcription still running on another thread
    threading.Thread(target=lambda: pg.transcribe(sys.argv[2], {"model": "whisper-1"}), daemon=True).start()
    time.sleep(1.5)
else:
    raise SystemExit(f"unknown mode {mode!r}")
print("exiting mid-request", flush=True)
