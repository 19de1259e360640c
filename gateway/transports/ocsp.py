"""Revocation of partners' certificates by OCSP (RFC 6960), ``[tls] ocsp = true``.

After a partner's TLS handshake, and before its connection reads a request, the client
certificate's status is asked of the OCSP responder of the CA that issued it: the
``[tls] ocsp_url`` when set, else the certificate's Authority Information Access. Fail closed:
a revoked certificate, a status the responder does not know, an answer that is not signed by
the issuing CA (or by a responder certificate that CA issued for OCSP signing), an answer past
its nextUpdate, and a responder that cannot be reached all refuse the connection, like a
revoked certificate in a CRL (T04/T05). No request is read, no receipt is given; the refusal is
counted and audited as a refused handshake. Outbound, the partner's server certificate is
asked about the same way on each new connection, before a request is written on it
(``https_client``): a refusal fails the attempt, and nothing is sent.

An answer is kept until its nextUpdate (at most ``ocsp_max_age_s``), so a responder is asked
about once per certificate per period, not per connection; concurrent handshakes of one
certificate share one request. An answer without nextUpdate is kept ``ocsp_max_age_s``.
The responder's address must be public, unless ``[tls] ocsp_allowed_networks`` lists it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from urllib.parse import urlsplit

import aiohttp
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.x509 import ocsp
from cryptography.x509.oid import AuthorityInformationAccessOID, ExtendedKeyUsageOID

from gateway.clock import Clock
from gateway.config import TlsConfig
from gateway.crypto.ocsp import build_request, cert_key, request_der, signed_by
from gateway.netpolicy import is_ip_literal, refusal
from gateway.transports.https_client import AddressRefused, PolicyResolver
from gateway.transports.tls_accept import PeerRefused

#: an OCSP answer is a few KiB; anything far larger is not one
MAX_RESPONSE_BYTES = 64 * 1024
#: how far the responder's clock may run ahead of ours (thisUpdate in the future)
CLOCK_SKEW = timedelta(minutes=5)


class OcspRefusal(PeerRefused):
    """The certificate may not be used: ``reason`` is ``revoked`` or ``revocation_unknown``."""


@dataclass(frozen=True, slots=True)
class _Answer:
    #: None: good; else the refusal it stands for
    refusal: OcspRefusal | None
    until: datetime


class OcspChecker:
    """Asks, verifies and keeps OCSP answers for partners' certificates (client and server)."""

    def __init__(
        self,
        tls: TlsConfig,
        issuers: Sequence[x509.Certificate],
        *,
        clock: Clock,
    ) -> None:
        self._issuers = tuple(issuers)
        self._url = tls.ocsp_url
        self._timeout_s = tls.ocsp_timeout_s
        self._max_age = timedelta(seconds=tls.ocsp_max_age_s)
        self._allowed = tls.ocsp_allowed_networks
        self._clock = clock
        self._answers: dict[tuple[bytes, int], _Answer] = {}
        self._asking: dict[tuple[bytes, int], asyncio.Future[_Answer]] = {}
        self._session: aiohttp.ClientSession | None = None
        self._resolver: PolicyResolver | None = None

    async def check(self, der: bytes) -> float:
        """Raise ``OcspRefusal`` unless the certificate's status is good; return the seconds
        that answer still holds (until its nextUpdate, at most ``ocsp_max_age_s`` after it was
        had), after which the status must be asked again."""
        try:
            cert = x509.load_der_x509_certificate(der)
        except ValueError as exc:
            raise OcspRefusal("revocation_unknown", f"unreadable certificate: {exc}") from None
        issuer = self._issuer_of(cert)
        key = (cert_key(issuer), cert.serial_number)
        answer = self._answers.get(key)
        if answer is None or answer.until <= self._clock.now():
            asking = self._asking.get(key)
            if asking is None:
                asking = asyncio.get_running_loop().create_future()
                self._asking[key] = asking
                try:
                    answer = await self._ask(cert, issuer)
                    asking.set_result(answer)
                except OcspRefusal as exc:
                    asking.set_exception(exc)
                    asking.exception()  # retrieved: no "never retrieved" warning
                    raise
                except BaseException:
                    asking.cancel()  # the handshakes waiting on it end too (shutdown)
                    raise
                finally:
                    del self._asking[key]
                self._answers[key] = answer
                self._forget_old()
            else:
                answer = await asyncio.shield(asking)
        if answer.refusal is not None:
            raise answer.refusal
        return max(0.0, (answer.until - self._clock.now()).total_seconds())

    def _issuer_of(self, cert: x509.Certificate) -> x509.Certificate:
        for issuer in self._issuers:
            if issuer.subject != cert.issuer:
                continue
            try:
                cert.verify_directly_issued_by(issuer)
            except (ValueError, TypeError, InvalidSignature):
                continue
            return issuer
        raise OcspRefusal(
            "revocation_unknown",
            f"the issuer {cert.issuer.rfc4514_string()!r} is not among the partner CA "
            "certificates (list an intermediate CA in the partner's ca file)",
        )

    def _responder_url(self, cert: x509.Certificate) -> str:
        if self._url is not None:
            return self._url
        try:
            access = cert.extensions.get_extension_for_class(x509.AuthorityInformationAccess)
        except x509.ExtensionNotFound:
            access = None
        for description in access.value if access is not None else ():
            location = description.access_location
            if (
                description.access_method == AuthorityInformationAccessOID.OCSP
                and isinstance(location, x509.UniformResourceIdentifier)
                and location.value.startswith(("http://", "https://"))
            ):
                return location.value
        raise OcspRefusal(
            "revocation_unknown", "the certificate names no OCSP responder and none is configured"
        )

    async def _ask(self, cert: x509.Certificate, issuer: x509.Certificate) -> _Answer:
        url = self._responder_url(cert)
        request = build_request(cert, issuer)
        body = await self._post(url, request_der(request))
        try:
            response = ocsp.load_der_ocsp_response(body)
        except ValueError as exc:
            raise OcspRefusal("revocation_unknown", f"{url}: not an OCSP response: {exc}") from None
        if response.response_status != ocsp.OCSPResponseStatus.SUCCESSFUL:
            raise OcspRefusal(
                "revocation_unknown", f"{url}: responder answered {response.response_status.name}"
            )
        self._verify_signer(response, issuer, url)
        single = _single_for(response, request, url)
        now = self._clock.now()
        if single.this_update_utc > now + CLOCK_SKEW:
            raise OcspRefusal("revocation_unknown", f"{url}: answer dated in the future")
        next_update = single.next_update_utc
        if next_update is not None and next_update <= now:
            raise OcspRefusal(
                "revocation_unknown", f"{url}: answer past its nextUpdate {next_update.isoformat()}"
            )
        until = min(next_update or now + self._max_age, now + self._max_age)
        status = single.certificate_status
        serial = f"{cert.serial_number:x}"
        if status == ocsp.OCSPCertStatus.GOOD:
            return _Answer(None, until)
        if status == ocsp.OCSPCertStatus.REVOKED:
            when = single.revocation_time_utc
            detail = f"certificate serial {serial} revoked" + (
                f" at {when.isoformat()}" if when is not None else ""
            )
            return _Answer(OcspRefusal("revoked", detail + f" (OCSP, {url})"), until)
        return _Answer(
            OcspRefusal("revocation_unknown", f"{url}: status of serial {serial} unknown"), until
        )

    async def _post(self, url: str, request: bytes) -> bytes:
        if self._session is None:
            self._resolver = PolicyResolver()
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(resolver=self._resolver, limit_per_host=8),
                trust_env=False,
                cookie_jar=aiohttp.DummyCookieJar(),
                timeout=aiohttp.ClientTimeout(total=self._timeout_s),
            )
        host = urlsplit(url).hostname or ""
        if is_ip_literal(host):
            refused = refusal(host, self._allowed)
            if refused is not None:
                raise OcspRefusal(
                    "revocation_unknown",
                    f"{url}: not connecting: {refused} (see [tls] ocsp_allowed_networks)",
                )
        else:
            assert self._resolver is not None
            self._resolver.allow(host, self._allowed)
        try:
            async with self._session.post(
                url,
                data=request,
                headers={"Content-Type": "application/ocsp-request"},
                allow_redirects=False,
            ) as answer:
                if answer.status != 200:
                    raise OcspRefusal("revocation_unknown", f"{url}: HTTP {answer.status}")
                body = await answer.content.read(MAX_RESPONSE_BYTES + 1)
        except AddressRefused as exc:
            raise OcspRefusal(
                "revocation_unknown", f"{url}: {exc} (see [tls] ocsp_allowed_networks)"
            ) from None
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            detail = str(exc) or type(exc).__name__
            raise OcspRefusal(
                "revocation_unknown", f"{url}: responder unreachable: {detail}"
            ) from None
        if len(body) > MAX_RESPONSE_BYTES:
            raise OcspRefusal(
                "revocation_unknown", f"{url}: answer over {MAX_RESPONSE_BYTES} bytes"
            )
        return body

    def _verify_signer(
        self, response: ocsp.OCSPResponse, issuer: x509.Certificate, url: str
    ) -> None:
        """The answer is signed by the issuing CA, or by a certificate that CA issued for OCSP
        signing (RFC 6960 4.2.2.2) that is valid now."""
        candidates = [issuer]
        for delegate in response.certificates:
            if delegate.issuer != issuer.subject:
                continue
            try:
                delegate.verify_directly_issued_by(issuer)
                usage = delegate.extensions.get_extension_for_class(x509.ExtendedKeyUsage)
            except (ValueError, TypeError, InvalidSignature, x509.ExtensionNotFound):
                continue
            now = self._clock.now()
            valid = delegate.not_valid_before_utc <= now <= delegate.not_valid_after_utc
            if ExtendedKeyUsageOID.OCSP_SIGNING in usage.value and valid:
                candidates.append(delegate)
        for signer in candidates:
            if signed_by(response, signer):
                return
        raise OcspRefusal(
            "revocation_unknown",
            f"{url}: the answer is not signed by the issuing CA or its responder",
        )

    def _forget_old(self) -> None:
        now = self._clock.now()
        if len(self._answers) > 4096:
            self._answers = {k: a for k, a in self._answers.items() if a.until > now}

    async def start(self) -> None:
        """Nothing to start: the responder is asked at the first handshake."""

    async def stop(self) -> None:
        session, self._session = self._session, None
        if session is not None:
            await session.close()


def _single_for(
    response: ocsp.OCSPResponse, request: ocsp.OCSPRequest, url: str
) -> ocsp.OCSPSingleResponse:
    for single in response.responses:
        if (
            single.serial_number == request.serial_number
            and single.issuer_key_hash == request.issuer_key_hash
            and single.issuer_name_hash == request.issuer_name_hash
        ):
            return single
    raise OcspRefusal("revocation_unknown", f"{url}: the answer is about another certificate")
