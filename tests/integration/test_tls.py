"""TLS by configuration, with certificates made here: services to a nats-server that requires client
certificates (mTLS), and the gateway's gRPC server with TLS and with client-certificate auth."""

import asyncio
import datetime
import ipaddress
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from grpc_health.v1 import health_pb2, health_pb2_grpc

from kefu.gateway.app import GatewayService, GatewaySettings
from kefu.plugins.app import PluginsService, PluginsSettings
from kefu.proto.bus.v1 import common_pb2
from kefu.shared.bus import Bus
from kefu.shared.config import KefuSettings
from kefu.shared.errors import Unavailable
from kefu.shared.natsserver import NatsServer
from kefu.shared.service import health_subject, start_in_background

pytestmark = pytest.mark.integration


@dataclass
class Pki:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    rogue_cert: Path  # a client certificate from another CA
    rogue_key: Path


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> Path:
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))
    return path


def _cert(path: Path, subject: str, key: ec.EllipticCurvePrivateKey, issuer: x509.Name,
          issuer_key: ec.EllipticCurvePrivateKey, *, ca: bool = False, server: bool = False) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    builder = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
               .issuer_name(issuer).public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if server:
        builder = builder.add_extension(x509.SubjectAlternativeName(
            [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
    if not ca:
        builder = builder.add_extension(x509.ExtendedKeyUsage(
            [ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
    cert = builder.sign(issuer_key, hashes.SHA256())
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return cert


def make_pki(d: Path) -> Pki:
    """A CA, a server certificate for 127.0.0.1/localhost, a client certificate, and a rogue client's."""
    ca_key, rogue_ca_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "kefu test CA")])
    rogue_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "rogue CA")])
    _cert(d / "ca.pem", "kefu test CA", ca_key, ca_name, ca_key, ca=True)
    keys = {n: ec.generate_private_key(ec.SECP256R1()) for n in ("server", "client", "rogue")}
    _cert(d / "server.pem", "nats", keys["server"], ca_name, ca_key, server=True)
    _cert(d / "client.pem", "kefu-service", keys["client"], ca_name, ca_key)
    _cert(d / "rogue.pem", "intruder", keys["rogue"], rogue_name, rogue_ca_key)
    return Pki(d / "ca.pem", d / "server.pem", _write_key(d / "server.key", keys["server"]), d / "client.pem",
               _write_key(d / "client.key", keys["client"]), d / "rogue.pem", _write_key(d / "rogue.key", keys["rogue"]))


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    return make_pki(tmp_path)


async def test_services_reach_a_nats_that_requires_client_certificates(pki, tmp_path):
    flags = ("--tls", "--tlscert", str(pki.server_cert), "--tlskey", str(pki.server_key), "--tlsverify",
             "--tlscacert", str(pki.ca))
    with NatsServer(tmp_path / "js", extra_args=flags, log_file=tmp_path / "nats.log") as nats:
        tls = {"nats_tls_ca": pki.ca, "nats_tls_cert": pki.client_cert, "nats_tls_key": pki.client_key}
        svc = PluginsService(PluginsSettings(nats_url=nats.url, data_dir=tmp_path, log_level="warning", **tls))
        stop = asyncio.Event()
        task = await start_in_background(svc, stop, timeout=60)
        try:
            assert svc.bus is not None and svc.bus.nc.connected_url is not None
            bus = await Bus.connect([nats.url], "tls-client", tls=KefuSettings(**tls).nats_tls())
            try:
                reply = await bus.request(health_subject("plugins"), common_pb2.HealthRequest(),
                                          common_pb2.HealthReply)
                assert reply.status == "ok"  # a round trip through the TLS server, both ends with certificates
            finally:
                await bus.close()
            # Without a certificate the server admits, no connection: TLS without one, one from another
            # CA, or plain TCP.
            refused = [KefuSettings(nats_tls_ca=pki.ca).nats_tls(),
                       KefuSettings(nats_tls_ca=pki.ca, nats_tls_cert=pki.rogue_cert,
                                    nats_tls_key=pki.rogue_key).nats_tls(),
                       None]
            for ctx in refused:
                with pytest.raises(Unavailable):
                    await Bus.connect([nats.url], "intruder", tls=ctx, connect_timeout=1.5)
        finally:
            stop.set()
            await task
    assert "TLS" in (tmp_path / "nats.log").read_text()


async def test_settings_refuse_half_a_tls_configuration(pki):
    with pytest.raises(ValueError):
        KefuSettings(nats_tls_cert=pki.client_cert)  # a certificate without its key
    with pytest.raises(ValueError):
        GatewaySettings(grpc_tls_client_ca=pki.ca)  # client auth without a server certificate
    with pytest.raises(ValueError):
        KefuSettings(nats_tls_ca=pki.ca.with_name("missing.pem"))


async def _health(channel: grpc.aio.Channel) -> int:
    stub = health_pb2_grpc.HealthStub(channel)
    return (await stub.Check(health_pb2.HealthCheckRequest(), timeout=5)).status


async def test_grpc_over_tls_and_with_client_certificates(pki, tmp_path, nats_url, monkeypatch):
    monkeypatch.setenv("KEFU_ADMIN_TOKEN", "admin-for-tls-test")
    ca = pki.ca.read_bytes()
    client = grpc.ssl_channel_credentials(ca, pki.client_key.read_bytes(), pki.client_cert.read_bytes())
    rogue = grpc.ssl_channel_credentials(ca, pki.rogue_key.read_bytes(), pki.rogue_cert.read_bytes())
    for client_ca in (None, pki.ca):
        svc = GatewayService(GatewaySettings(nats_url=nats_url, data_dir=tmp_path, http_port=0, grpc_port=0,
                                             log_level="warning", grpc_tls_cert=pki.server_cert,
                                             grpc_tls_key=pki.server_key, grpc_tls_client_ca=client_ca))
        stop = asyncio.Event()
        task = await start_in_background(svc, stop)
        target = f"127.0.0.1:{svc.grpc_port}"
        try:
            async with grpc.aio.secure_channel(target, client) as ch:
                assert await _health(ch) == health_pb2.HealthCheckResponse.SERVING
            server_only = grpc.ssl_channel_credentials(ca)
            async with grpc.aio.secure_channel(target, server_only) as ch:
                if client_ca is None:
                    assert await _health(ch) == health_pb2.HealthCheckResponse.SERVING
                else:  # mTLS: a client without a certificate is turned away
                    with pytest.raises(grpc.aio.AioRpcError) as err:
                        await _health(ch)
                    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
            if client_ca is not None:
                async with grpc.aio.secure_channel(target, rogue) as ch:
                    with pytest.raises(grpc.aio.AioRpcError):
                        await _health(ch)
            async with grpc.aio.insecure_channel(target) as ch:  # plaintext gets nothing from a TLS port
                with pytest.raises(grpc.aio.AioRpcError):
                    await _health(ch)
        finally:
            stop.set()
            await task
