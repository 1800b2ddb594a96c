"""The tokenizer stage over real gRPC agrees with the Hugging Face tokenizer."""

import asyncio

import pytest

from tandem.services.tokenizer.core import TokenizerCore
from tandem.services.tokenizer.service import start_server
from tandem.services.transport.tokenizer_client import TokenizerClient


def test_tokenizer_service_round_trips(tiny_llama):
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(tiny_llama)
    messages = [{"role": "user", "content": "héllo, 日本"}]

    async def scenario():
        server, port = await start_server(TokenizerCore(tiny_llama), "127.0.0.1:0")
        client = TokenizerClient(f"127.0.0.1:{port}")
        try:
            ids = await client.tokenize("héllo wörld")
            text = await client.detokenize(ids)
            prompt, chat_ids = await client.apply_chat_template(messages)
            info = await client.info()
            with pytest.raises(ValueError, match="messages"):
                await client.apply_chat_template([])
            with pytest.raises(ValueError, match="tokens"):
                await client.detokenize([10**6])
            ids_again = await client.tokenize("still serving")  # after errors
            return ids, text, prompt, chat_ids, info, ids_again
        finally:
            await client.close()
            await server.stop(grace=None)

    ids, text, prompt, chat_ids, info, ids_again = asyncio.run(scenario())
    assert ids == hf.encode("héllo wörld") and text == hf.decode(ids, skip_special_tokens=True)
    assert prompt == hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert chat_ids == hf.encode(prompt, add_special_tokens=False)
    assert info.vocab_size == len(hf) and ids_again == hf.encode("still serving")
