"""Speech engines: text-to-speech with piper, speech-to-text with faster-whisper."""
