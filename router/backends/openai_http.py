"""The ``openai`` backend: an OpenAI-compatible HTTP API (OpenAI, vLLM, another
mesh's router front door) as the one endpoint of a model, over aiohttp.

The translation is ``openai_wire``'s (pure); this module only moves bytes: one
``ClientSession`` per endpoint, made lazily in the running loop, its connection
pool capped at the endpoint's in-flight cap (the dispatcher's cap is the first
guard of the provider's rate limit, the pool a second). The key from
``api_key_env`` goes as ``Authorization: Bearer``; nothing else of the mesh's
(internal token, ``cmesh-*`` parameters, request ids) is sent. Inputs reach us
already masked by the trust layer.

Errors are ``BackendError`` with ``started`` once a token was yielded, so the
attempts stage never retries a stream the caller has begun to read.
"""
from __future__ import annotations

import asyncio
import json
import ssl
from collections.abc import AsyncIterator

import aiohttp
import grpc

from cmesh import wire
from cmesh.config import BackendConfig
from protos import inference_pb2 as pb
from router.backends import openai_wire as ow
from router.backends.base import BackendError

GRACE_S = 30.0          # a leaving endpoint's in-flight calls get this long


def _ssl(spec: BackendConfig) -> ssl.SSLContext | bool:
    if spec.tls is None:
        return True                                     # https: the system's trust store
    context = ssl.create_default_context(cafile=spec.tls.ca)
    if spec.tls.cert:
        context.load_cert_chain(spec.tls.cert, spec.tls.key)
    return context


class OpenAIBackend:
    external = True

    def __init__(self, address: str, model: str, spec: BackendConfig, secret: str | None = None,
                 max_inflight: int = 32) -> None:
        self.address = address                          # the base URL
        self.model = model
        self.spec = spec
        self.api = spec.openai_api
        self._headers = {"Authorization": f"Bearer {secret}"} if secret else {}
        self._limit = max_inflight
        self._session: aiohttp.ClientSession | None = None
        self._extra = {"server_hostname": spec.tls.server_name} if spec.tls and spec.tls.server_name else {}
        self._inflight = 0
        self._idle = asyncio.Event()
        self._idle.set()

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            connector = aiohttp.TCPConnector(limit=self._limit, ssl=_ssl(self.spec))
            self._session = aiohttp.ClientSession(connector=connector, headers=self._headers)
        return self._session

    def _broken(self, exc: BaseException, started: bool) -> BackendError:
        if isinstance(exc, TimeoutError):
            return BackendError(grpc.StatusCode.DEADLINE_EXCEEDED, f"openai backend {self.address}: timed out",
                                started=started, retryable=False, component=self.model)
        return BackendError(grpc.StatusCode.UNAVAILABLE,
                            f"openai backend {self.address}: {type(exc).__name__}: {exc}",
                            reason="backend_connection_failed", started=started, component=self.model)

    async def _open(self, body: dict, timeout: float) -> aiohttp.ClientResponse:
        """POST ``body`` on the model's API; the response once its status is 200."""
        try:
            response = await self._client().post(self.address + ow.PATHS[self.api], json=body,
                                                 timeout=aiohttp.ClientTimeout(total=max(timeout, 0.001)),
                                                 **self._extra)
            if response.status == 200:
                return response
            try:
                detail = await response.json(content_type=None)
            except ValueError:
                detail = await response.text()
            finally:
                response.release()
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            raise self._broken(exc, started=False) from None
        raise ow.error_of_status(response.status, detail, response.headers, model=self.model,
                                 address=self.address)

    def _begin(self) -> None:
        self._inflight += 1
        self._idle.clear()

    def _end(self) -> None:
        self._inflight -= 1
        if not self._inflight:
            self._idle.set()

    # -- Backend -------------------------------------------------------------------

    async def call(self, request: pb.ModelInferRequest, timeout: float) -> pb.ModelInferResponse:
        body = ow.request_body(self.spec, self.model, request, stream=False)
        self._begin()
        try:
            response = await self._open(body, timeout)
            try:
                answer = await response.json(content_type=None)
            except (aiohttp.ClientError, TimeoutError, OSError) as exc:
                raise self._broken(exc, started=False) from None
            except ValueError:
                raise ow.malformed(self.model, "a body that is not JSON") from None
            finally:
                response.release()
        finally:
            self._end()
        return ow.whole_answer(self.spec, self.model, request, answer)

    async def stream(self, request: pb.ModelInferRequest, timeout: float) -> AsyncIterator[pb.ModelInferResponse]:
        if self.api == "embeddings":
            answer = await self.call(request, timeout)
            answer.parameters[wire.P_FINAL].bool_param = True
            yield answer
            return
        body = ow.request_body(self.spec, self.model, request, stream=True)
        self._begin()
        try:
            response = await self._open(body, timeout)
            started, done, usage = False, False, None
            events = ow.SseEvents()
            try:
                async for line in response.content:
                    data = events.feed(line.decode("utf-8", errors="replace"))
                    if data is None:
                        continue
                    if data.strip() == "[DONE]":
                        done = True
                        break
                    try:
                        chunk = json.loads(data)
                    except ValueError:
                        raise ow.malformed(self.model, "an event that is not JSON") from None
                    if not isinstance(chunk, dict):
                        raise ow.malformed(self.model, "an event that is not a JSON object")
                    if "error" in chunk:
                        raise ow.error_in_stream(chunk, model=self.model, address=self.address, started=started)
                    usage = ow.usage_of(chunk) or usage
                    choice = ow.first_choice(chunk)
                    text = ow.text_of_choice(self.api, choice, delta=True) if choice else ""
                    if text:
                        started = True
                        yield ow.delta_response(self.model, request, text)
            except (aiohttp.ClientError, TimeoutError, OSError) as exc:
                raise self._broken(exc, started) from None
            finally:
                # Left early (the caller went away, or an error): close the connection,
                # which tells the provider to stop generating.
                if done:
                    response.release()
                else:
                    response.close()
            if not done:
                raise BackendError(grpc.StatusCode.UNAVAILABLE,
                                   f"openai backend {self.address}: the stream ended before [DONE]",
                                   reason="backend_stream_cut", started=started, component=self.model)
            yield ow.final_response(self.model, request, usage)
        finally:
            self._end()

    async def ready(self, model: str, version: str = "", timeout: float = 5.0) -> bool:
        try:
            async with self._client().get(f"{self.address}/models", timeout=aiohttp.ClientTimeout(total=timeout),
                                          **self._extra) as response:
                return response.status == 200
        except (aiohttp.ClientError, TimeoutError, OSError):
            return False

    async def metadata(self, model: str, version: str = "", timeout: float = 10.0) -> pb.ModelMetadataResponse:
        return ow.metadata(model, self.spec)

    async def close(self, graceful: bool = False) -> None:
        if graceful:
            try:
                await asyncio.wait_for(self._idle.wait(), GRACE_S)
            except TimeoutError:
                pass
        if self._session is not None:
            await self._session.close()
            self._session = None
