"""What keeps one hostile or unlucky request from costing the others: JSON bodies only, a size limit on them, and
prompts measured in bytes before they are tokenized.

- JSON only: a web page may send a cross-origin "simple" request (text/plain, a form, no content type) without
  asking the browser's permission first; it cannot send application/json that way. Refusing every other body
  (415) means no page a user visits can make a local server without an API key generate.
- Size: a body over `max_bytes` is refused (413) from its Content-Length before anything is read, or, without one,
  as soon as the bytes read pass the limit; reading stops there, so a 16 MiB body never sits in memory. The
  default is what the longest prompt that can fit the context could take: context x the most bytes one token stands
  for x 6 (JSON writes a control character as \\u00XX), and at least 1 MiB.
- Bytes before tokens: no token stands for more than `longest` bytes of text, so a text of B bytes has at least
  B / longest tokens, and one with B >= longest x context cannot fit. Such a prompt is refused without running the
  tokenizer over it. (This holds for the tokenizers Fermion reads, see data/tokenizer.py: byte-level BPE with no
  normalizer, and SentencePiece-style BPE whose normalizer only prepends a space and writes spaces as "▁".)

The handlers tokenize and render chat templates in a worker thread (asyncio.to_thread): the tokenizers library
releases the GIL while it encodes, so the event loop, and /health with it, keeps answering.
"""

from __future__ import annotations

from starlette.requests import ClientDisconnect, Request

from fermion.data.tokenizer import Tokenizer
from fermion.serve.protocol import APIError

JSON_ESCAPE = 6  # the most JSON bytes one byte of text can take: a control character written as \u00XX
MIN_REQUEST_BYTES = 1 << 20  # the default's floor: room for many prompts at once, and for long conversations


def longest_token_bytes(tokenizer: Tokenizer) -> int:
    """The most bytes of text one token can stand for; an added token written literally takes its own text."""
    added = [len(token.content.encode("utf-8")) for token in tokenizer.inner.get_added_tokens_decoder().values()]
    return max([int(tokenizer.token_bytes().max(initial=1)), *added])


class Guard:
    def __init__(self, tokenizer: Tokenizer, context: int, max_bytes: int | None = None):
        self.longest = longest_token_bytes(tokenizer)
        self.context = context
        self.max_bytes = max_bytes or max(MIN_REQUEST_BYTES, JSON_ESCAPE * self.longest * context)

    async def body(self, request: Request) -> bytes:
        """The request's body, if it is declared JSON and no longer than `max_bytes`."""
        media_type = request.headers.get("content-type", "").partition(";")[0].strip().lower()
        if media_type != "application/json":
            raise APIError(415, f"the request body must be JSON sent as 'Content-Type: application/json' (got "
                                f"{media_type or 'no content type'!r})"[:300])
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and (len(declared) > 15 or int(declared) > self.max_bytes):
            raise self._too_large()
        chunks, size = [], 0
        try:
            async for chunk in request.stream():
                size += len(chunk)
                if size > self.max_bytes:
                    raise self._too_large()
                chunks.append(chunk)
        except ClientDisconnect:
            raise APIError(400, "the client went away before sending the whole body") from None
        return b"".join(chunks)

    def _too_large(self) -> APIError:
        # Connection: close, so the server stops reading whatever of the body is still coming.
        return APIError(413, f"the request body is larger than this server accepts ({self.max_bytes:,} bytes; "
                             "fermion serve --max-request-bytes sets the limit)", code="request_too_large",
                        headers={"Connection": "close"})

    def check_length(self, text: str, param: str) -> None:
        """Refuse, without tokenizing it, a text too long for the context whatever its tokens turn out to be."""
        size = len(text.encode("utf-8"))
        fewest = -(-size // self.longest)
        if fewest >= self.context:
            raise APIError(400, f"this model's maximum context length is {self.context} tokens, and the prompt has "
                                f"at least {fewest:,} ({size:,} bytes, no token longer than {self.longest}); shorten "
                                "it", param=param, code="context_length_exceeded")
