"""REST throughput of carebroker: create and read Patients with wrk, on SQLite and PostgreSQL.

Usage (from the repository root, with the project's virtualenv):

    .venv/bin/python bench/rest.py                      # both databases, fresh servers
    .venv/bin/python bench/rest.py --db sqlite --workers 1
    .venv/bin/python bench/rest.py --url http://127.0.0.1:8080/fhir --db postgresql --token "$TOKEN"
    .venv/bin/python bench/rest.py --auth off           # the same without token checks (serve --auth off)

wrk drives the load because a Python client would be slower than the server it measures. The
create phase runs for a fixed time; the ids it created are then read back from the type history,
topped up over httpx if fewer than `-n` exist, and read at random in the read phase. Percentiles
come from a Lua `done()` hook (wrk's own `--latency` table has no machine-readable form). With
`--auth on` (the default) every request carries a bearer token, an RS256 JWT from a bench issuer
(its key made for the run, its JWKS in a file the server trusts through CAREBROKER_TRUSTED_ISSUERS);
`--auth off` starts the server with `--auth off`: the read phases of the two give the cost of token
checks. Each phase
also records how many CPU cores the server, wrk and everything else used: on a small or shared
machine that decides what the figures mean. Results go to stdout as a table and to
`bench/results/rest-<db>.json`, together with the commit of the checkout.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import resource
import secrets
import string
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from datetime import date, timedelta
from pathlib import Path
from typing import Any

import httpx
from joserfc import jwt
from joserfc.jwk import RSAKey

from common import WRK_LUA_REPORT, carebroker_command, free_port, machine_facts, process_tree, stop, wrk_result

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
NHS_NUMBER_SYSTEM = "https://fhir.nhs.uk/Id/nhs-number"
FHIR_JSON = "application/fhir+json"
WRK_THREADS = 2
WRK_TIMEOUT = "10s"  # a slow answer is a latency figure, not a socket error
CLK_TCK = os.sysconf("SC_CLK_TCK")

# Synthetic data, shared by the Lua generator (wrk) and the Python one (top-up). Nobody real: NHS
# numbers from the 999 test range, mobiles from Ofcom's drama range, e-mail at example.com.
GIVEN = {
    "female": ("Margaret", "Aisha", "Sarah", "Priya", "Joan", "Fatima", "Emily", "Grace", "Agnieszka",
               "Olivia", "Patricia", "Nisha", "Helen", "Amara", "Eileen", "Sophie", "Zainab", "Ruth"),
    "male": ("James", "Mohammed", "Oliver", "Harjit", "David", "Kwame", "Tomasz", "Daniel", "Arjun",
             "George", "Patrick", "Samuel", "Imran", "Michael", "Chidi", "Peter", "Ravi", "William"),
    "other": ("Alex", "Sam", "Jordan", "Charlie"),
    "unknown": ("Alex", "Sam", "Jordan", "Charlie"),
}
FAMILY = ("Smith", "Patel", "Khan", "Jones", "Williams", "Brown", "Taylor", "Ahmed", "Singh", "Begum",
          "O'Connor", "Nowak", "Okafor", "Mensah", "Hussain", "Davies", "Evans", "Wilson", "Thomas",
          "Roberts", "Shah", "Ali", "Kowalski", "Ibrahim", "Murphy", "Clarke", "Gill", "Osei", "Walker")
STREETS = ("Acacia Avenue", "Elm Grove", "Station Road", "Church Lane", "Victoria Road", "Park View",
           "Queens Walk", "Mill Lane", "Cedar Close", "Orchard Way", "Kingsley Road", "Meadow Rise")
# (town, postcode districts): England and Wales, where NHS numbers are issued.
TOWNS = (("London", ("W13", "NW10", "SE15", "E17", "N1", "SW9")), ("Manchester", ("M14", "M20", "M8")),
         ("Leeds", ("LS6", "LS11")), ("Birmingham", ("B15", "B29", "B11")), ("Bristol", ("BS3", "BS7")),
         ("Cardiff", ("CF10", "CF24")), ("Newcastle upon Tyne", ("NE1", "NE6")), ("Norwich", ("NR2",)))
POSTCODE_LETTERS = "ABDEFGHJLNPQRSTUWXYZ"  # inward-code letters (C, I, K, M, O, V are never used)
NHS_WEIGHTS = (10, 9, 8, 7, 6, 5, 4, 3, 2)
GENDER_ROLLS = ((0.49, "female"), (0.98, "male"), (0.99, "other"), (1.0, "unknown"))
BIRTH_FROM, BIRTH_TO = date(1925, 1, 1), date(2025, 12, 31)

# POST a freshly generated Patient per request (the Lua twin of `uk_patient`).
LUA_CREATE = WRK_LUA_REPORT + r"""
local GIVEN = $given
local FAMILY = $family
local STREETS = $streets
local TOWNS = $towns
local LETTERS = "$letters"
local WEIGHTS = $weights
local BIRTH_FROM, BIRTH_TO = $birth_from, $birth_to  -- seconds since 1970

function init(args)
  math.randomseed(os.time() * 1000 + tid)
  wrk.method = "POST"
  wrk.headers["Content-Type"] = "$content_type"
end

local function pick(list) return list[math.random(#list)] end

local function letter()
  local i = math.random(#LETTERS)
  return LETTERS:sub(i, i)
end

local function nhs_number()
  while true do
    local first = string.format("999%06d", math.random(0, 999999))
    local total = 0
    for i = 1, 9 do total = total + tonumber(first:sub(i, i)) * WEIGHTS[i] end
    local check = 11 - total % 11
    if check == 11 then check = 0 end
    if check ~= 10 then return first .. check end
  end
end

local function gender()
  local roll = math.random()
  $gender_rolls
end

function request()
  local sex = gender()
  local given, family = pick(GIVEN[sex]), pick(FAMILY)
  local town = pick(TOWNS)
  local telecom = string.format('{"system":"phone","value":"07700 900%03d","use":"mobile"}',
                                math.random(0, 999))
  if math.random() < 0.5 then
    telecom = telecom .. string.format(',{"system":"email","value":"%s.%s%d@example.com","use":"home"}',
                                       given:lower(), family:lower():gsub("'", ""), math.random(1, 9999))
  end
  local body = string.format(
    '{"resourceType":"Patient","identifier":[{"system":"$nhs_system","value":"%s"}],"active":true,' ..
    '"name":[{"use":"official","family":"%s","given":["%s"]}],"telecom":[%s],"gender":"%s",' ..
    '"birthDate":"%s","address":[{"use":"home","line":["%d %s"],"city":"%s","postalCode":"%s %d%s%s",' ..
    '"country":"GB"}]}',
    nhs_number(), family, given, telecom, sex, os.date("!%Y-%m-%d", math.random(BIRTH_FROM, BIRTH_TO)),
    math.random(1, 250), pick(STREETS), town[1], pick(town[2]), math.random(1, 9), letter(), letter())
  return wrk.format(nil, nil, nil, body)
end
"""

# GET a random id from the file named by the first script argument.
LUA_READ = WRK_LUA_REPORT + r"""
local ids = {}

function init(args)
  math.randomseed(os.time() * 1000 + tid)
  for line in io.lines(args[1]) do ids[#ids + 1] = line end
end

function request()
  return wrk.format(nil, wrk.path .. "/" .. ids[math.random(#ids)])
end
"""


@dataclass
class Phase:
    """What one wrk run measured."""

    db: str
    phase: str
    seconds: float
    requests: int
    requests_per_s: float
    mean_ms: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    p999_ms: float
    max_ms: float
    non_2xx: int  # wrk counts HTTP status >= 400 ("Non-2xx or 3xx responses")
    socket_errors: int  # connect, read, write and timeout
    # CPU cores in use during the run: the server (None if not started here), wrk, and the rest
    # (PostgreSQL, other users of the machine, steal; with --url also the server).
    cpu_server: float | None
    cpu_wrk: float
    cpu_other: float

    @property
    def errors(self) -> int:
        return self.non_2xx + self.socket_errors


@dataclass(frozen=True)
class Target:
    """The server under test: its FHIR base, and its process id when this script started it."""

    base: str
    pid: int | None
    token: str | None = None  # the bearer token every request carries (None: --auth off)

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"} if self.token else {}


# -- synthetic patients ------------------------------------------------------------------------------

def nhs_number(rng: random.Random) -> str:
    """A 999-range test number with a valid Modulus 11 check digit."""
    while True:
        first = f"999{rng.randint(0, 999_999):06d}"
        check = 11 - sum(int(d) * w for d, w in zip(first, NHS_WEIGHTS, strict=True)) % 11
        if check != 10:
            return first + str(check % 11)


def uk_patient(rng: random.Random) -> dict[str, Any]:
    """One Patient shaped like those the Lua script posts (the top-up must not differ from wrk's)."""
    roll = rng.random()
    sex = next(g for bound, g in GENDER_ROLLS if roll < bound)
    given, family = rng.choice(GIVEN[sex]), rng.choice(FAMILY)
    town, districts = rng.choice(TOWNS)
    telecom = [{"system": "phone", "value": f"07700 900{rng.randint(0, 999):03d}", "use": "mobile"}]
    if rng.random() < 0.5:
        handle = f"{given}.{family}".lower().replace("'", "")
        telecom.append({"system": "email", "value": f"{handle}{rng.randint(1, 9999)}@example.com", "use": "home"})
    birth = BIRTH_FROM + timedelta(days=rng.randint(0, (BIRTH_TO - BIRTH_FROM).days))
    postcode = (f"{rng.choice(districts)} {rng.randint(1, 9)}"
                f"{rng.choice(POSTCODE_LETTERS)}{rng.choice(POSTCODE_LETTERS)}")
    return {
        "resourceType": "Patient",
        "identifier": [{"system": NHS_NUMBER_SYSTEM, "value": nhs_number(rng)}],
        "active": True,
        "name": [{"use": "official", "family": family, "given": [given]}],
        "telecom": telecom,
        "gender": sex,
        "birthDate": birth.isoformat(),
        "address": [{"use": "home", "line": [f"{rng.randint(1, 250)} {rng.choice(STREETS)}"], "city": town,
                     "postalCode": postcode, "country": "GB"}],
    }


def lua_literal(value: Any) -> str:
    """Python tuples/strings/numbers as a Lua table constructor (the data has no quotes to escape)."""
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k} = {lua_literal(v)}" for k, v in value.items()) + "}"
    if isinstance(value, (tuple, list)):
        return "{" + ", ".join(lua_literal(v) for v in value) + "}"
    if isinstance(value, str):
        return f'"{value}"'
    return str(value)


def create_script() -> str:
    """LUA_CREATE with the shared data filled in."""
    def epoch(day: date) -> int:
        return (day - date(1970, 1, 1)).days * 86_400

    rolls = "\n  ".join(f'if roll < {bound} then return "{g}" end' for bound, g in GENDER_ROLLS[:-1])
    return string.Template(LUA_CREATE).substitute(
        given=lua_literal(GIVEN), family=lua_literal(FAMILY), streets=lua_literal(STREETS),
        towns=lua_literal(TOWNS), letters=POSTCODE_LETTERS, weights=lua_literal(NHS_WEIGHTS),
        birth_from=epoch(BIRTH_FROM), birth_to=epoch(BIRTH_TO), content_type=FHIR_JSON,
        nhs_system=NHS_NUMBER_SYSTEM, gender_rolls=rolls + f'\n  return "{GENDER_ROLLS[-1][1]}"')


# -- wrk -----------------------------------------------------------------------------------------------

def run_wrk(db: str, phase: str, script: Path, target: Target, seconds: int, connections: int,
            script_args: Sequence[str] = ()) -> Phase:
    """Run wrk against `<base>/Patient`, read the figures from the line our `done()` prints, and
    note where the CPU went meanwhile (on a small machine wrk and the server share it)."""
    cmd = ["wrk", f"-t{min(WRK_THREADS, connections)}", f"-c{connections}", f"-d{seconds}s",
           f"--timeout={WRK_TIMEOUT}", "--latency", "-s", str(script), f"{target.base}/Patient"]
    for name, value in target.headers.items():  # wrk -H headers go into wrk.headers, which our scripts keep
        cmd[1:1] = ["-H", f"{name}: {value}"]
    if script_args:
        cmd += ["--", *script_args]
    shown = " ".join(cmd).replace(target.token, "<token>") if target.token else " ".join(cmd)
    print(f"[{db}] {phase}: {shown}", file=sys.stderr, flush=True)
    server_pids = process_tree(target.pid) if target.pid else []
    start = (time.monotonic(), machine_ticks(), process_ticks(server_pids), children_cpu())
    proc = subprocess.run(cmd, capture_output=True, text=True)
    end = (time.monotonic(), machine_ticks(), process_ticks(server_pids), children_cpu())
    wall = end[0] - start[0]
    busy, wrk_cores = (end[1] - start[1]) / CLK_TCK / wall, (end[3] - start[3]) / wall
    server_cores = (end[2] - start[2]) / CLK_TCK / wall if server_pids else None
    r = wrk_result(proc)
    duration = r["duration_us"] / 1e6
    result = Phase(db=db, phase=phase, seconds=round(duration, 2), requests=r["requests"],
                   requests_per_s=round(r["requests"] / duration, 1), mean_ms=round(r["mean_us"] / 1000, 2),
                   p50_ms=r["p50_us"] / 1000, p90_ms=r["p90_us"] / 1000, p99_ms=r["p99_us"] / 1000,
                   p999_ms=r["p999_us"] / 1000, max_ms=r["max_us"] / 1000, non_2xx=r["non_2xx_3xx"],
                   socket_errors=r["socket_errors"],
                   cpu_server=None if server_cores is None else round(server_cores, 2), cpu_wrk=round(wrk_cores, 2),
                   cpu_other=round(busy - wrk_cores - (server_cores or 0), 2))
    if result.errors:
        print(f"\n!!! {db} {phase}: {result.non_2xx} HTTP error responses and {result.socket_errors} socket "
              f"errors in {result.requests} requests: THESE FIGURES ARE NOT VALID !!!\n", file=sys.stderr, flush=True)
    return result


def process_ticks(pids: Sequence[int]) -> int:
    """User + system CPU ticks of the given processes (fields 14 and 15 of /proc/<pid>/stat)."""
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError):
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])
    return total


def machine_ticks() -> int:
    """Non-idle CPU ticks of the whole machine, steal included (a busy host competes too)."""
    user, nice, system, _idle, _iowait, irq, softirq, steal = map(
        int, Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9])
    return user + nice + system + irq + softirq + steal


def children_cpu() -> float:
    """CPU seconds of finished child processes: the difference around a wrk run is wrk's."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


# -- the server under test ------------------------------------------------------------------------------

@contextlib.contextmanager
def database(db: str, workdir: Path, pg: str) -> Iterator[str]:
    """A fresh, empty database: a new SQLite file, or a new PostgreSQL schema dropped afterwards."""
    if db == "sqlite":
        yield f"sqlite:///{workdir / 'bench.db'}"
        return
    schema = f"bench_{secrets.token_hex(4)}"
    subprocess.run(["psql", pg, "-qc", f"CREATE SCHEMA {schema}"], check=True)
    try:
        base = pg.replace("postgresql://", "postgresql+psycopg://", 1)
        yield f"{base}?options=-csearch_path%3D{schema}"
    finally:
        subprocess.run(["psql", pg, "-qc", f"SET client_min_messages = warning; DROP SCHEMA {schema} CASCADE"],
                       check=True)


def bench_issuer(workdir: Path, audience: str) -> tuple[str, str]:
    """A token issuer for the run: (CAREBROKER_TRUSTED_ISSUERS for the server, a system/*.* token
    valid for a day: a backend service with no user role, which the access policy leaves to its
    scopes). Its JWKS is a file in `workdir`."""
    key = RSAKey.generate_key(2048, parameters={"kid": "bench"})
    jwks = workdir / "bench-jwks.json"
    jwks.write_text(json.dumps({"keys": [key.as_dict(private=False)]}))
    issuer, now = "https://bench.carebroker.invalid", int(time.time())
    claims = {"iss": issuer, "sub": "bench", "aud": audience, "iat": now, "exp": now + 86400,
              "jti": secrets.token_hex(8), "scope": "system/*.*", "client_id": "bench"}
    token = jwt.encode({"alg": "RS256", "typ": "at+jwt", "kid": "bench"}, claims, key, algorithms=["RS256"])
    return json.dumps([{"issuer": issuer, "jwks": str(jwks), "audience": audience}]), token


@contextlib.contextmanager
def server(database_url: str, workers: int, workdir: Path, auth: bool = True) -> Iterator[Target]:
    """Start `carebroker serve`; yield its FHIR base once every worker has started; stop it."""
    port = free_port()
    log_path = workdir / "server.log"
    base = f"http://127.0.0.1:{port}/fhir"
    env, token, flags = dict(os.environ), None, ["--auth", "off"]
    if auth:
        env["CAREBROKER_TRUSTED_ISSUERS"], token = bench_issuer(workdir, base)
        flags = []
    with open(log_path, "w") as log:
        # info level: uvicorn then says "Application startup complete" once per worker (the CLI
        # turns access logs off, so nothing is logged per request).
        proc = subprocess.Popen([carebroker_command(), "serve", "--host", "127.0.0.1", "--port", str(port),
                                 "--database", database_url, "--workers", str(workers), "--log-level", "info",
                                 *flags], stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=env)
    try:
        wait_ready(proc, log_path, workers)
        yield Target(base, proc.pid, token)
    finally:
        stop(proc)


def wait_ready(proc: subprocess.Popen[bytes], log_path: Path, workers: int, timeout: float = 120) -> None:
    """Wait until all workers are up: before that, wrk would measure fewer workers than claimed."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"carebroker exited with {proc.returncode}:\n{log_path.read_text()[-3000:]}")
        if log_path.read_text().count("Application startup complete") >= workers:
            return
        time.sleep(0.2)
    raise RuntimeError(f"carebroker did not start within {timeout}s:\n{log_path.read_text()[-3000:]}")


# -- phases --------------------------------------------------------------------------------------------

def patient_ids(client: httpx.Client, base: str) -> list[str]:
    """Ids of the live Patients, from the type history (newest first, so the first entry per id is
    its current state; a deletion has no `resource`)."""
    seen: set[str] = set()
    live: list[str] = []
    url: str | None = f"{base}/Patient/_history?_count=1000"
    while url:
        bundle = client.get(url).raise_for_status().json()
        for entry in bundle.get("entry", []):
            rid = entry["fullUrl"].rsplit("/", 1)[-1]
            if rid not in seen:
                seen.add(rid)
                if "resource" in entry:
                    live.append(rid)
        url = next((link["url"] for link in bundle.get("link", []) if link["relation"] == "next"), None)
    return live


def top_up(client: httpx.Client, base: str, count: int, concurrency: int) -> list[str]:
    """Create `count` more Patients over httpx, so the read phase has the promised `-n` ids."""
    rng = random.Random()

    def create(body: dict[str, Any]) -> str:
        resp = client.post(f"{base}/Patient", json=body, headers={"Content-Type": FHIR_JSON})
        if resp.status_code != 201:
            raise RuntimeError(f"top-up create failed: {resp.status_code} {resp.text[:500]}")
        return str(resp.json()["id"])

    with ThreadPoolExecutor(concurrency) as pool:
        return list(pool.map(create, [uk_patient(rng) for _ in range(count)]))


def bench(db: str, target: Target, args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    """Create phase, id collection (plus top-up), read phase."""
    create_lua, read_lua, ids_file = workdir / "create.lua", workdir / "read.lua", workdir / "ids.txt"
    create_lua.write_text(create_script())
    read_lua.write_text(LUA_READ)
    create = run_wrk(db, "create", create_lua, target, args.create_seconds, args.concurrency)
    limits = httpx.Limits(max_connections=args.concurrency)
    with httpx.Client(timeout=60, limits=limits, headers=target.headers) as client:
        ids = patient_ids(client, target.base)
        missing = args.n - len(ids)
        topped_up = top_up(client, target.base, missing, args.concurrency) if missing > 0 else []
    ids += topped_up
    ids_file.write_text("\n".join(ids) + "\n")
    read = run_wrk(db, "read", read_lua, target, args.read_seconds, args.concurrency, [str(ids_file)])
    return {"phases": [create, read], "patients": len(ids), "topped_up": len(topped_up)}


# -- report ---------------------------------------------------------------------------------------------

def checkout() -> str:
    """Commit of this checkout (+ "-dirty"): the server changes fast, so figures must name the code."""
    out = subprocess.run(["git", "-C", str(REPO), "describe", "--always", "--dirty"], capture_output=True, text=True)
    return out.stdout.strip() or "unknown"


def print_report(runs: list[dict[str, Any]], facts: dict[str, Any]) -> None:
    print(f"\nmachine: {facts['nproc']} CPUs ({facts['cpu_model']}), Python {facts['python']}, {facts['wrk']}")
    for run in runs:
        s = run["settings"]
        print(f"{run['db']}: workers={s['workers']}, concurrency={s['concurrency']} (wrk -t{s['wrk_threads']}), "
              f"create {s['create_seconds']}s, read {s['read_seconds']}s over {run['patients']} patients "
              f"({run['topped_up']} topped up over httpx after the create phase); auth {s['auth']}; "
              f"load average before: {' '.join(run['load_before'])}; code {run['checkout']}")
    if facts["nproc"] <= 4:
        print(f"note: wrk runs on the same {facts['nproc']} CPUs as the server, so these are lower bounds")
    header = (f"{'db':<12}{'phase':<8}{'req/s':>10}{'p50 ms':>10}{'p99 ms':>10}{'errors':>8}"
              f"  CPU cores: server / wrk / other")
    print("\n" + header + "\n" + "-" * len(header))
    for run in runs:
        for p in run["phases"]:
            server = "?" if p["cpu_server"] is None else f"{p['cpu_server']:.2f}"
            print(f"{p['db']:<12}{p['phase']:<8}{p['requests_per_s']:>10.1f}{p['p50_ms']:>10.2f}"
                  f"{p['p99_ms']:>10.2f}{p['errors']:>8}  {server:>16} / {p['cpu_wrk']:.2f} / {p['cpu_other']:.2f}"
                  + ("  <-- ERRORS" if p["errors"] else ""))
    print("(other: PostgreSQL, anything else running on the machine, and time stolen by the host)")
    failed = [f"{p['db']} {p['phase']}" for run in runs for p in run["phases"] if p["errors"]]
    if failed:
        print(f"\n!!! ERRORS in {', '.join(failed)}: those figures are not valid (details in the JSON) !!!")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--db", choices=["sqlite", "postgresql"],
                        help="only this database (default: both); with --url, the label for the results")
    parser.add_argument("--url", help="FHIR base of an already running server, e.g. http://127.0.0.1:8080/fhir")
    parser.add_argument("-n", type=int, default=5000, help="Patients that must exist for the read phase")
    parser.add_argument("-c", "--concurrency", type=int, default=16, help="wrk connections")
    parser.add_argument("--workers", type=int, default=2, help="server worker processes (not with --url)")
    parser.add_argument("--create-seconds", type=int, default=10, help="wrk duration of the create phase")
    parser.add_argument("--read-seconds", type=int, default=10, help="wrk duration of the read phase")
    parser.add_argument("--auth", choices=["on", "off"], default="on",
                        help="on: every request carries a bearer token (default); off: serve --auth off")
    parser.add_argument("--token", help="with --url and --auth on: the bearer token to send")
    parser.add_argument("--pg", default="postgresql://127.0.0.1:5432/test",
                        help="PostgreSQL database in which a fresh schema is made for each run")
    args = parser.parse_args(argv)

    facts = machine_facts()
    RESULTS.mkdir(exist_ok=True)
    runs = []
    targets = [args.db or "external"] if args.url else [args.db] if args.db else ["sqlite", "postgresql"]
    for db in targets:
        # The machine may be shared: a busy one before the run explains odd figures afterwards.
        load_before = Path("/proc/loadavg").read_text().split()[:3]
        code = checkout()
        with tempfile.TemporaryDirectory(prefix="carebroker-bench-") as tmp:
            workdir = Path(tmp)
            with contextlib.ExitStack() as stack:
                if args.url:
                    token = args.token if args.auth == "on" else None
                    target, workers = Target(args.url.rstrip("/"), None, token), "unknown (external server)"
                else:
                    url = stack.enter_context(database(db, workdir, args.pg))
                    target = stack.enter_context(server(url, args.workers, workdir, args.auth == "on"))
                    workers = args.workers
                result = bench(db, target, args, workdir)
        if checkout() != code:
            print(f"\n!!! the checkout changed during the {db} run (was {code}, now {checkout()}): "
                  "the figures mix two versions of the server !!!\n", file=sys.stderr)
        settings = {"workers": workers, "concurrency": args.concurrency,
                    "wrk_threads": min(WRK_THREADS, args.concurrency), "wrk_timeout": WRK_TIMEOUT, "n": args.n,
                    "create_seconds": args.create_seconds, "read_seconds": args.read_seconds, "url": target.base,
                    "auth": args.auth}
        phases = [{**asdict(p), "errors": p.errors} for p in result["phases"]]
        run = {"db": db, "checkout": code, "settings": settings, "machine": facts, "load_before": load_before,
               "patients": result["patients"], "topped_up": result["topped_up"], "phases": phases,
               "errors": sum(p["errors"] for p in phases)}
        (RESULTS / f"rest-{db}{'' if args.auth == 'on' else '-auth-off'}.json").write_text(json.dumps(run, indent=2) + "\n")
        runs.append(run)
    print_report(runs, facts)
    return 1 if any(run["errors"] for run in runs) else 0


if __name__ == "__main__":
    sys.exit(main())
