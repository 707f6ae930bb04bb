"""A real OpenLDAP server for the directory sign-in tests: Debian's ``slapd`` with a directory of its
own (``cn=config`` made with ``slapadd``), on a free port, with StartTLS (a CA and a server
certificate made here), people and groups under ``dc=example,dc=org``."""

from __future__ import annotations

import datetime
import shutil
import socket
import subprocess
import time
from pathlib import Path

import ldap
import ldap.modlist
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from tests.processes import end

SUFFIX = "dc=example,dc=org"
ADMIN_DN, ADMIN_PASSWORD = f"cn=admin,{SUFFIX}", "admin-secret"
SERVICE_DN, SERVICE_PASSWORD = f"cn=console,ou=services,{SUFFIX}", "service-secret"
PEOPLE, GROUPS = f"ou=people,{SUFFIX}", f"ou=groups,{SUFFIX}"
SCHEMAS = ("core", "cosine", "inetorgperson", "nis")

CONFIG = """dn: cn=config
objectClass: olcGlobal
cn: config
olcPidFile: {root}/slapd.pid
olcTLSCACertificateFile: {root}/ca.pem
olcTLSCertificateFile: {root}/server.pem
olcTLSCertificateKeyFile: {root}/server.key

dn: cn=schema,cn=config
objectClass: olcSchemaConfig
cn: schema

{includes}

dn: cn=module{{0}},cn=config
objectClass: olcModuleList
cn: module{{0}}
olcModulePath: /usr/lib/ldap
olcModuleLoad: back_mdb

dn: olcDatabase={{0}}config,cn=config
objectClass: olcDatabaseConfig
olcDatabase: {{0}}config
olcAccess: {{0}}to * by * none

dn: olcDatabase={{1}}mdb,cn=config
objectClass: olcDatabaseConfig
objectClass: olcMdbConfig
olcDatabase: {{1}}mdb
olcDbDirectory: {root}/data
olcSuffix: {suffix}
olcRootDN: {admin}
olcRootPW: {admin_password}
olcAccess: {{0}}to attrs=userPassword by self read by anonymous auth by * none
olcAccess: {{1}}to * by users read by * none
"""


def _person(uid: str, password: str, name: str) -> str:
    return f"""dn: uid={uid},{PEOPLE}
objectClass: inetOrgPerson
uid: {uid}
cn: {name}
sn: {name.split()[-1]}
givenName: {name.split()[0]}
mail: {uid}@example.org
userPassword: {password}
"""


def _group(cn: str, members: list[str]) -> str:
    lines = [f"dn: cn={cn},{GROUPS}", "objectClass: groupOfNames", f"cn: {cn}"]
    lines += [f"member: uid={m},{PEOPLE}" for m in members]
    lines.append(f"member: {SERVICE_DN}")  # groupOfNames needs a member: one that no mapping cares about
    return "\n".join(lines) + "\n"


DATA = "\n".join([
    f"dn: {SUFFIX}\nobjectClass: dcObject\nobjectClass: organization\ndc: example\no: Example\n",
    f"dn: {PEOPLE}\nobjectClass: organizationalUnit\nou: people\n",
    f"dn: {GROUPS}\nobjectClass: organizationalUnit\nou: groups\n",
    f"dn: ou=services,{SUFFIX}\nobjectClass: organizationalUnit\nou: services\n",
    f"dn: {SERVICE_DN}\nobjectClass: organizationalRole\nobjectClass: simpleSecurityObject\ncn: console\n"
    f"userPassword: {SERVICE_PASSWORD}\n",
    _person("alice", "alice-pw", "Alice Admin"),
    _person("fiona", "fiona-pw", "Fiona Finance"),
    _person("lee", "lee-pw", "Lee Legal"),
    _person("nobody", "nobody-pw", "No Body"),
    _group("ml-admins", ["alice"]),
    _group("finance", ["fiona"]),
    _group("legal-leads", ["lee"]),
    _group("staff", ["alice", "fiona", "lee", "nobody"]),
])  # fmt: skip


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _certificates(root: Path) -> None:
    """A CA, and a server certificate for 127.0.0.1 signed by it."""
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Test directory CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(hours=1))
          .not_valid_after(now + datetime.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .sign(ca_key, hashes.SHA256()))  # fmt: skip
    key = ec.generate_private_key(ec.SECP256R1())
    import ipaddress

    server = (x509.CertificateBuilder()
              .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]))
              .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
              .not_valid_before(now - datetime.timedelta(hours=1)).not_valid_after(now + datetime.timedelta(days=1))
              .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                                                          x509.DNSName("localhost")]), critical=False)
              .sign(ca_key, hashes.SHA256()))  # fmt: skip
    (root / "ca.pem").write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    (root / "server.pem").write_bytes(server.public_bytes(serialization.Encoding.PEM))
    (root / "server.key").write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                        serialization.NoEncryption()))  # fmt: skip


class Slapd:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.port = _free_port()
        self.uri = f"ldap://127.0.0.1:{self.port}"
        self.ca_file = str(root / "ca.pem")
        self.process: subprocess.Popen | None = None

    def start(self) -> Slapd:
        if not shutil.which("slapd", path="/usr/sbin:/usr/bin"):
            raise RuntimeError("slapd is missing: `make directory` installs it")
        root = self.root
        shutil.rmtree(root, ignore_errors=True)  # a directory of its own, fresh (an earlier run's is gone)
        (root / "data").mkdir(parents=True)
        (root / "slapd.d").mkdir(exist_ok=True)
        _certificates(root)
        includes = "\n".join(f"include: file:///etc/ldap/schema/{name}.ldif" for name in SCHEMAS)
        (root / "config.ldif").write_text(CONFIG.format(root=root, includes=includes, suffix=SUFFIX, admin=ADMIN_DN,
                                                        admin_password=ADMIN_PASSWORD))  # fmt: skip
        (root / "data.ldif").write_text(DATA)
        for number, source in ((0, "config.ldif"), (1, "data.ldif")):
            done = subprocess.run(["/usr/sbin/slapadd", "-n", str(number), "-F", str(root / "slapd.d"), "-l",
                                   str(root / source)], capture_output=True, text=True)  # fmt: skip
            if done.returncode:
                raise RuntimeError(f"slapadd {source} failed: {done.stderr[-2000:]}")
        self.run()
        return self

    def run(self) -> None:
        """(Re)start the server on its port, in the foreground of its own process."""
        log = (self.root / "slapd.log").open("ab")
        self.process = subprocess.Popen(["/usr/sbin/slapd", "-d", "0", "-h", self.uri, "-F",
                                         str(self.root / "slapd.d")], stdout=log, stderr=log)  # fmt: skip
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return
            except OSError:
                if self.process.poll() is not None:
                    raise RuntimeError(f"slapd exited: {(self.root / 'slapd.log').read_text()[-2000:]}") from None
                time.sleep(0.1)
        raise RuntimeError("slapd did not listen within 20 s")

    def stop(self) -> None:
        end(self.process)

    def admin(self) -> ldap.ldapobject.LDAPObject:
        connection = ldap.initialize(self.uri)
        connection.simple_bind_s(ADMIN_DN, ADMIN_PASSWORD)
        return connection

    def _member(self, change: int, group: str, uid: str) -> None:
        connection = self.admin()
        try:
            connection.modify_s(f"cn={group},{GROUPS}", [(change, "member", [f"uid={uid},{PEOPLE}".encode()])])
        finally:
            connection.unbind_s()

    def remove_member(self, group: str, uid: str) -> None:
        self._member(ldap.MOD_DELETE, group, uid)

    def add_member(self, group: str, uid: str) -> None:
        self._member(ldap.MOD_ADD, group, uid)
