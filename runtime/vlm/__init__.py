"""The paged-KV VLM engine: engine, scheduler, sequences, KV cache, runner, attention, tokenizer, decode graphs."""
