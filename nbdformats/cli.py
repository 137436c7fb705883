"""The command line, compatible with nbdkit's:

    nbdformats [OPTIONS] [--filter=NAME ...] PLUGIN [[KEY=]VALUE ...]

Options and key=value arguments may be mixed as with GNU getopt; `--` ends options.
Filters are listed outermost (nearest the client) first.  Each key=value goes to the
first filter that declares the key, else to the plugin; a bare VALUE goes to the plugin's
"magic" parameter (e.g. `file DISK`, `memory 1G`).

Start-up follows nbdkit's order: configure the chain, bind, start the --run command, drop
privileges (-u/-g), detach, write the pid file, serve.  Relative paths (-P, -U, TMPDIR, TLS
files) are made absolute first, as the server changes to / when it detaches.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from urllib.parse import quote

from . import __version__
from .api.errors import ConfigError

log = logging.getLogger("nbdformats")


@dataclass(frozen=True)
class Option:
    """One command-line option: its long names (the first is the canonical one), short letter,
    the metavar of its value (empty: a flag), and where it is stored (`dest`, `const`) when
    several options set one thing and the last given wins (-o/-n, -4/-6)."""

    names: tuple[str, ...]
    help: str
    short: str = ""
    metavar: str = ""
    repeatable: bool = False
    dest: str = ""
    const: object = True

    @property
    def key(self) -> str:
        return self.dest or self.names[0]


# nbdkit 1.32's options first (nbdkit(1)), then newer nbdkit's, then our own.
OPTIONS: tuple[Option, ...] = (
    Option(("ipv4-only",), "listen on IPv4 only (the last of -4/-6 wins)", "4", dest="family",
           const=socket.AF_INET),
    Option(("ipv6-only",), "listen on IPv6 only", "6", dest="family", const=socket.AF_INET6),
    Option(("debug",), "set a debug flag of a plugin or filter", "D", "NAME.FLAG=N", repeatable=True),
    Option(("dump-config",), "print the build configuration and exit"),
    Option(("dump-plugin",), "print the plugin's details, machine readable, and exit"),
    Option(("exit-with-parent",), "exit when the parent process exits (implies -f)"),
    Option(("exportname", "export", "export-name"), "the export name in the --run URI and $exportname",
           "e", "NAME"),
    Option(("filter",), "add a filter (outermost first)", metavar="FILTER", repeatable=True),
    Option(("foreground", "no-fork"), "do not detach", "f"),
    Option(("group",), "change to GROUP after binding (name or gid)", "g", "GROUP"),
    Option(("help",), "show this help, or a plugin's and filters' parameters", "h"),
    Option(("ipaddr", "ip-addr"), "listen on this address (repeatable)", "i", "IPADDR", repeatable=True),
    Option(("log",), "where messages go", metavar="stderr|syslog|null"),
    Option(("long-options",), "list the long options and exit"),
    Option(("mask-handshake",), "offer only these global handshake flags (bit 0 fixed newstyle, "
           "bit 1 no zeroes)", metavar="MASK"),
    Option(("newstyle", "new-style"), "newstyle protocol (the default; the last of -n/-o wins)", "n",
           dest="oldstyle", const=False),
    Option(("no-sr", "no-structured-replies"), "do not offer structured replies"),
    Option(("oldstyle", "old-style"), "oldstyle protocol, for legacy clients", "o"),
    Option(("pidfile", "pid-file"), "write the server's pid here once it serves", "P", "PIDFILE"),
    Option(("port",), "TCP port (default 10809)", "p", "PORT"),
    Option(("readonly", "read-only"), "serve read-only", "r"),
    Option(("run",), "run CMD with $uri, $nbd, $unixsocket, $port, $exportname set; exit with its status",
           metavar="CMD"),
    Option(("selinux-label",), "SELinux label of the listening socket", metavar="LABEL"),
    Option(("short-options",), "list the short options and exit"),
    Option(("single", "stdin"), "serve one client on stdin/stdout", "s"),
    Option(("swap",), "lock the server in memory, for swap exports"),
    Option(("threads",), "threads per connection for blocking plugins (default 16)", "t", "THREADS"),
    Option(("tls",), "TLS", metavar="off|on|require"),
    Option(("tls-certificates",), "directory of ca-cert.pem, server-cert.pem, server-key.pem", metavar="DIR"),
    Option(("tls-psk",), "pre-shared keys file (psktool's format)", metavar="FILE"),
    Option(("tls-verify-peer",), "require client certificates"),
    Option(("unix",), "listen on a Unix socket; - makes a private one", "U", "SOCKET"),
    Option(("user",), "change to USER after binding (name or uid)", "u", "USER"),
    Option(("verbose",), "debug messages", "v"),
    Option(("version",), "print the version (and the plugin's and filters') and exit", "V"),
    Option(("vsock",), "listen on AF_VSOCK, port -p (default 10809)"),
    # Newer nbdkit.
    Option(("no-mc", "no-meta-contexts"), "do not offer meta contexts (no block status)"),
    Option(("keepalive",), "TCP keepalive probes on client connections"),
    Option(("print-uri",), "print the URI clients connect to"),
    Option(("timeout", "handshake-timeout"), "drop clients that do not finish the handshake in SECONDS "
           "(default 60)", metavar="SECONDS"),
    # nbdformats' own.
    Option(("list",), "list the plugins and filters and exit"),
    Option(("exit-last",), "exit when the last client disconnects"),
    Option(("max-connections",), "refuse connections beyond N", metavar="N"),
    Option(("fd",), "serve the connected socket N", metavar="N"),
    Option(("no-handshake",), "with --fd: skip the handshake (kernel hand-off)"),
    Option(("description",), "the export description clients see", metavar="TEXT"),
    Option(("stats-json",), "record request statistics in PATH", metavar="PATH"),
    Option(("stats-interval",), "seconds between --stats-json records (default 1)", metavar="SECONDS"),
    Option(("busy-poll",), "a lone connection polls up to US microseconds for its next request "
           "(default 64, 0 off)", metavar="US"),
)
_BY_LONG = {name: option for option in OPTIONS for name in option.names}
_BY_SHORT = {option.short: option for option in OPTIONS if option.short}

def usage() -> str:
    lines = ["usage: nbdformats [OPTIONS] [--filter=FILTER ...] PLUGIN [[KEY=]VALUE ...]",
             "       nbdformats PLUGIN --help            the plugin's parameters (and the filters')",
             "       nbdformats --filter=FILTER --help   a filter's parameters",
             "       nbdformats --dump-plugin PLUGIN     the plugin's details, machine readable",
             "       nbdformats --dump-config | --list | --version", "", "options:"]
    for option in OPTIONS:
        names = ", ".join([f"-{option.short}"] * bool(option.short) + [f"--{n}" for n in option.names])
        lines.append(f"  {names}{' ' + option.metavar if option.metavar else ''}")
        lines.append(f"      {option.help}")
    return "\n".join(lines)


@dataclass
class Options:
    values: dict[str, object] = field(default_factory=dict)
    positional: list[str] = field(default_factory=list)

    def get(self, name: str, default: object = None) -> object:
        return self.values.get(name, default)

    def text(self, name: str) -> str | None:
        value = self.values.get(name)
        return None if value is None else str(value)

    def flag(self, name: str) -> bool:
        return bool(self.values.get(name))

    def items(self, name: str) -> list[str]:
        """The values of a repeatable option, in command-line order."""
        values = self.values.get(name, [])
        assert isinstance(values, list)
        return values

    def number(self, name: str, default: int) -> int:
        """An option stored as a number (a `const` such as -4's address family)."""
        value = self.values.get(name, default)
        assert isinstance(value, int)
        return value

    def store(self, option: Option, value: object) -> None:
        if option.repeatable:
            values = self.values.setdefault(option.key, [])
            assert isinstance(values, list)
            values.append(value)
        else:
            self.values[option.key] = value


def parse_argv(argv: list[str]) -> Options:
    opts = Options()
    i = 0
    while i < len(argv):
        arg = argv[i]
        i += 1
        if arg == "--":
            opts.positional += argv[i:]
            break
        if arg.startswith("--"):
            name, eq, value = arg[2:].partition("=")
            option = _BY_LONG.get(name)
            if option is None:
                raise ConfigError(f"unknown option --{name} (nbdformats --help lists them)")
            if option.metavar:
                if not eq:
                    if i >= len(argv):
                        raise ConfigError(f"--{name} needs a value ({option.metavar})")
                    value = argv[i]
                    i += 1
                opts.store(option, value)
            elif eq:
                raise ConfigError(f"--{name} takes no value")
            else:
                opts.store(option, option.const)
            continue
        if arg.startswith("-") and len(arg) > 1 and "=" not in arg:
            j = 1
            while j < len(arg):
                letter = arg[j]
                option = _BY_SHORT.get(letter)
                if option is None:
                    raise ConfigError(f"unknown option -{letter} (nbdformats --help lists them)")
                if option.metavar:
                    value = arg[j + 1:]
                    if not value:
                        if i >= len(argv):
                            raise ConfigError(f"-{letter} needs a value ({option.metavar})")
                        value = argv[i]
                        i += 1
                    opts.store(option, value)
                    break
                opts.store(option, option.const)
                j += 1
            continue
        opts.positional.append(arg)
    return opts


def absolute_paths(opts: Options) -> None:
    """Paths the server uses after it has changed to / (detached): made absolute now, as nbdkit
    does with nbdkit_absolute_path.  TMPDIR too, for the temporary files of cache, cow, ..."""
    for name in ("pidfile", "tls-certificates", "tls-psk", "stats-json"):
        path = opts.text(name)
        if path:
            opts.values[name] = os.path.abspath(path)
    if opts.text("unix") not in (None, "-"):
        opts.values["unix"] = os.path.abspath(str(opts.get("unix")))
    tmpdir = os.environ.get("TMPDIR")
    if tmpdir and not os.path.isabs(tmpdir):
        os.environ["TMPDIR"] = os.path.abspath(tmpdir)
        tempfile.tempdir = None  # gettempdir() may have cached the relative one


def build_chain(plugin_name: str, filter_names: list[str], args: list[str], debug_flags: list | None = None):
    """Load, configure and ready the plugin and filters from PLUGIN [[KEY=]VALUE ...]."""
    from .api.chain import Chain
    from .server.debugflags import apply_debug_flags
    from .registry import load_filter, load_plugin

    plugin_cls = load_plugin(plugin_name)
    filter_classes = [load_filter(name) for name in filter_names]
    pairs = assign_args(plugin_name, filter_names, [*filter_classes, plugin_cls], args)
    chain = Chain([cls() for cls in filter_classes], plugin_cls())
    # As nbdkit sets debug variables when it loads a plugin: before configuring.
    for warning in apply_debug_flags([*chain.filters, chain.plugin], debug_flags or []):
        log.warning("%s", warning)
    chain.configure(pairs)
    return chain


def help_command(plugin_name: str, filter_names: list[str]) -> str:
    """The command that lists the parameters of this chain."""
    return " ".join(["nbdformats", *(f"--filter={name}" for name in filter_names), plugin_name, "--help"])


# nbdkit's is_config_key (server/main.c): a letter first, then letters, digits, '.', '_', '-'.
CONFIG_KEY = re.compile(r"[A-Za-z][A-Za-z0-9._-]*")


def assign_args(plugin_name: str, filter_names: list[str], components: list,
                args: list[str]) -> dict[int, list[tuple[str, str]]]:
    """key=value pairs per component (filters first, the plugin last) from [[KEY=]VALUE ...]."""
    from .api.params import magic_param, params_of

    plugin_cls = components[-1]
    declared = [{p.key for p in params_of(cls)} for cls in components]
    pairs: dict[int, list[tuple[str, str]]] = {}
    for arg in args:
        key, eq, value = arg.partition("=")
        if not eq or not CONFIG_KEY.fullmatch(key):
            # A bare value, or one whose '=' follows no valid key ("a/b=c", "1=2", "(1)=x" in the
            # data plugin): the plugin's magic parameter, as nbdkit's is_config_key decides.
            magic = magic_param(plugin_cls)
            if magic is None:
                raise ConfigError(f"{plugin_cls.name}: this plugin takes no bare argument ({arg!r}); use key=value")
            key, value = magic.key, arg
        for index, keys in enumerate(declared):
            if key in keys:
                break
        else:
            index = len(components) - 1
            if not getattr(plugin_cls, "accepts_any_key", False):
                owners = ", ".join(c.name for c in components)
                raise ConfigError(f"unknown parameter {key!r} (not a parameter of {owners}; "
                                  f"'{help_command(plugin_name, filter_names)}' lists them)")
        pairs.setdefault(index, []).append((key, value))
    return pairs


def print_help(plugin_name: str | None, filter_names: list[str]) -> None:
    """nbdkit's `PLUGIN --help`: the parameters of each filter and of the plugin.  A filter's
    name in the plugin's place (`nbdformats luks --help`) shows that filter."""
    from .api.params import describe_params
    from .registry import is_filter_name, load_filter, load_plugin

    if plugin_name is not None and is_filter_name(plugin_name) and not filter_names:
        filter_names, plugin_name = [plugin_name], None
    if plugin_name is None and not filter_names:
        print(usage())
        return
    for name in filter_names:
        filter_class = load_filter(name)
        print(f"filter {filter_class.name}: {filter_class.summary()}\n{describe_params(filter_class)}"
              f"{describe_debug_flags(filter_class)}\n")
    if plugin_name is not None:
        plugin_class = load_plugin(plugin_name)
        print(f"plugin {plugin_class.name}: {plugin_class.summary()}\n{describe_params(plugin_class)}"
              f"{describe_debug_flags(plugin_class)}")


def describe_debug_flags(cls) -> str:
    if not cls.debug_flag_help:
        return ""
    return "\n  debug flags (-D NAME.FLAG=N):\n" + "\n".join(
        f"    -D {cls.name}.{flag}=N  {text}" for flag, text in sorted(cls.debug_flag_help.items()))


def print_version(plugin_name: str | None, filter_names: list[str]) -> None:
    """As nbdkit -V: the server's version, then each filter's and the plugin's (loading them, so
    a missing one fails: nbdkit's test scripts probe for components this way)."""
    from .api.chain import Component
    from .registry import component_version, load_filter, load_plugin

    classes: list[type[Component]] = [load_filter(name) for name in filter_names]
    if plugin_name is not None:
        classes.append(load_plugin(plugin_name))
    print(f"nbdformats {__version__}")
    for cls in classes:
        print(f"{cls.name} {component_version(cls)}")


def dump_config() -> None:
    """nbdkit's --dump-config keys, with nbdformats' values."""
    package = os.path.dirname(os.path.abspath(__file__))
    binary = os.path.realpath(sys.argv[0]) if os.path.isfile(sys.argv[0]) else sys.executable
    scripts = os.path.dirname(sys.executable)
    version = __version__.split(".")
    config = {
        "binary": binary, "bindir": scripts, "exit_with_parent": "yes",
        "filterdir": os.path.join(package, "filters"), "host_cpu": os.uname().machine,
        "host_os": "linux-gnu" if sys.platform == "linux" else sys.platform,
        "libdir": os.path.dirname(package), "mandir": os.path.join(sys.prefix, "share", "man"),
        "name": "nbdformats", "plugindir": os.path.join(package, "plugins"), "sbindir": scripts,
        "selinux": "yes", "sysconfdir": "/etc", "tls": "yes", "version": __version__,
        "version_major": version[0], "version_minor": version[1], "zstd": "yes",
    }
    for key, value in config.items():
        print(f"{key}={value}")


def dump_plugin(plugin_name: str, filter_names: list[str], args: list[str]) -> None:
    """nbdkit's --dump-plugin: the core's lines, then the plugin's own (its dump_plugin()).

    As nbdkit, the arguments are parsed (nbdkit calls .config) but config_complete does not
    run: `--dump-plugin python script.py` loads the script and prints its dump_plugin too.
    """
    import contextlib
    import io

    from .api.params import apply_params, params_of
    from .registry import component_version, load_filter, load_plugin

    cls = load_plugin(plugin_name)
    plugin = cls()
    filters = [load_filter(name)() for name in filter_names]
    if args:
        pairs = assign_args(plugin_name, filter_names, [*(type(f) for f in filters), cls], args)
        for index, component in enumerate([*filters, plugin]):
            apply_params(component, pairs.get(index, []), component.name)
    # The plugin's lines come last but may change what the first ones say (a script's thread model).
    own_lines = io.StringIO()
    with contextlib.redirect_stdout(own_lines):
        plugin.dump_plugin()
    module = sys.modules.get(cls.__module__)  # a plugin loaded by path is not in sys.modules
    print(f"path={getattr(module, '__file__', None) or os.path.abspath(plugin_name)}")
    print(f"name={cls.name}")
    print(f"version={component_version(cls)}")
    print("api_version=2")
    print("max_thread_model=parallel")  # the server's
    # The chain's: the strictest of the plugin's and its filters' (nbdkit's top->thread_model).
    model = min([plugin.thread_model, *(f.configured_thread_model() for f in filters)])
    print(f"thread_model={model.name.lower()}")
    if cls.has_thread_model:
        print("has_thread_model=1")
    for p in params_of(cls):
        magic = " (magic)" if p.magic else ""
        print(f"param={p.key}:{p.type.metavar}{magic}")
    for flag in sorted(cls.debug_flag_help):
        print(f"debug_flag={cls.name}.{flag}")
    print(f"{cls.name}_summary={cls.summary()}")
    print(own_lines.getvalue(), end="", flush=True)


def list_components() -> None:
    from .registry import load_filter, load_plugin, names

    for kind, loader in (("plugin", load_plugin), ("filter", load_filter)):
        print(f"{kind}s:")
        for name in names(kind + ""):
            try:
                summary = loader(name).summary()
            except Exception as e:  # a broken component must not hide the others
                summary = f"(cannot load: {e})"
            print(f"  {name:14} {summary}")


def component_of(logger_name: str) -> str:
    """The plugin or filter a logger belongs to: nbdformats.luks, nbdformats.filters.luks
    and nbdformats.plugins.luks all give "luks"; the server's own loggers give ""."""
    parts = logger_name.split(".")
    if parts[0] != "nbdformats" or len(parts) < 2 or parts[1] in _NOT_COMPONENTS:
        return ""
    if parts[1] in ("filters", "plugins"):
        # Shared helper modules (_decompress, _members ...) are not components.
        if len(parts) < 3 or parts[2].startswith("_"):
            return ""
        return parts[2].replace("_", "-")
    return parts[1]


_NOT_COMPONENTS = {"api", "server", "protocol", "client", "cli", "registry", "formats", "statsplot", "nbdkit_compat", "__main__"}


class ComponentFormatter(logging.Formatter):
    """`nbdformats: luks: debug: message`: the component that logged, like nbdkit's
    `nbdkit: luks: debug: ...`; the server's own messages have no component.  A message that
    already starts with "luks: " does not say it twice."""

    def __init__(self, prefix: str, with_pid: bool = False) -> None:
        super().__init__()
        self.prefix, self.with_pid = prefix, with_pid

    def format(self, record: logging.LogRecord) -> str:
        component = component_of(record.name)
        message = record.getMessage()
        prefix = f"{self.prefix}[{record.process}]" if self.with_pid else self.prefix
        if component:
            prefix = f"{prefix}: {component}"
            message = message.removeprefix(f"{component}: ")
        text = f"{prefix}: {record.levelname.lower()}: {message}"
        if record.exc_info:
            text += "\n" + self.formatException(record.exc_info)
        return text


def setup_logging(verbose: bool, destination: str) -> None:
    """-v: debug messages of every component (each line names its component); --log: where to."""
    if destination not in ("stderr", "syslog", "null"):
        raise ConfigError("--log must be stderr, syslog or null")
    level = logging.DEBUG if verbose else logging.INFO
    root = logging.getLogger("nbdformats")
    root.setLevel(level)
    root.handlers.clear()
    if destination == "null":
        root.addHandler(logging.NullHandler())
    elif destination == "syslog":
        from logging.handlers import SysLogHandler  # only for --log=syslog: not imported by every start
        handler = SysLogHandler(address="/dev/log") if os.path.exists("/dev/log") \
            else logging.NullHandler()
        handler.setFormatter(ComponentFormatter("nbdformats", with_pid=True))
        root.addHandler(handler)
    else:
        stream = logging.StreamHandler(sys.stderr)
        stream.setFormatter(ComponentFormatter("nbdformats"))
        root.addHandler(stream)
    root.propagate = False


def open_stats_file(opts: Options, settings) -> None:
    """--stats-json PATH [--stats-interval SECONDS]: open the file now, so errors reach the terminal."""
    path = opts.text("stats-json")
    if path is None:
        if opts.get("stats-interval") is not None:
            raise ConfigError("--stats-interval goes with --stats-json")
        return
    from .server.stats import StatsRecorder

    try:
        interval = float(str(opts.get("stats-interval", 1)))
    except ValueError:
        interval = 0.0
    if not 0.01 <= interval <= 86400:
        raise ConfigError("--stats-interval must be a number of seconds between 0.01 and 86400")
    try:
        settings.stats = StatsRecorder.open(path, interval, connections=lambda: len(settings.connections))
    except OSError as e:
        raise ConfigError(f"--stats-json: cannot write {path}: {e.strerror}") from None


def stderr_is_stdin_socket() -> bool:
    try:
        stdin, stderr = os.fstat(0), os.fstat(2)
    except OSError:
        return False
    return stat.S_ISSOCK(stdin.st_mode) and (stdin.st_dev, stdin.st_ino) == (stderr.st_dev, stderr.st_ino)


def exit_with_parent() -> None:
    import ctypes  # only here and for --swap: not imported by every start
    libc = ctypes.CDLL(None, use_errno=True)
    PR_SET_PDEATHSIG = 1
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) != 0:
        raise ConfigError("--exit-with-parent is not supported here")


def lock_memory_for_swap() -> None:
    """--swap: do not let the kernel swap us out or OOM-kill us while we serve swap."""
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    MCL_CURRENT, MCL_FUTURE = 1, 2
    if libc.mlockall(MCL_CURRENT | MCL_FUTURE) != 0:
        log.warning("--swap: mlockall failed (%s): memory may be swapped out",
                    os.strerror(ctypes.get_errno()))
    try:
        with open("/proc/self/oom_score_adj", "w") as f:
            f.write("-1000")
    except OSError as e:
        log.warning("--swap: cannot lower the OOM score: %s", e.strerror)


def make_uri(unix_path: str | None, port: str | None, address: str | None, export: str, tls: bool,
             vsock: bool = False) -> str:
    """$uri as nbdkit 1.32 writes it: the export name only when there is one
    (`nbd+unix://?socket=PATH`), the port always (`nbd://localhost:10809`), and `nbds` only when
    TLS is required (`tls`): with --tls=on a client may connect without it."""
    scheme = "nbds" if tls else "nbd"
    path = f"/{quote(export, safe='')}" if export else ""
    if unix_path:
        return f"{scheme}+unix://{path}?socket={quote(unix_path, safe='/')}"
    if vsock:
        return f"{scheme}+vsock://1:{port or '10809'}{path}"  # CID 1: this machine (VMADDR_CID_LOCAL)
    host = address or "localhost"
    if ":" in host:
        host = f"[{host}]"
    return f"{scheme}://{host}:{port or '10809'}{path}"


def daemonize() -> None:
    """Detach like nbdkit without -f: fork, new session, stdio to /dev/null."""
    if os.fork() > 0:
        os._exit(0)
    os.setsid()
    if os.fork() > 0:
        os._exit(0)
    os.chdir("/")
    from .server.listeners import redirect_stdio_to_null
    redirect_stdio_to_null()


def write_pidfile(path: str) -> None:
    """As nbdkit: written once the server is ready to serve, and left in place when it exits."""
    # Written whole under another name, then renamed: whoever waits for the file never reads it
    # empty or half written.
    partial = f"{path}.{os.getpid()}.tmp"
    try:
        with open(partial, "w") as f:
            f.write(f"{os.getpid()}\n")
        os.replace(partial, path)
    except OSError as e:
        with contextlib.suppress(OSError):
            os.unlink(partial)
        raise ConfigError(f"-P {path}: {e.strerror}") from None


def parse_mask(text: str) -> int:
    from .protocol import wire as P
    from .server.debugflags import parse_int

    try:
        mask = parse_int(text)
        if mask < 0:
            raise ValueError
    except ValueError:
        raise ConfigError(f"--mask-handshake {text}: not an unsigned integer") from None
    return (P.FLAG_FIXED_NEWSTYLE | P.FLAG_NO_ZEROES) & mask


def integer(opts: Options, name: str, default: int, minimum: int, maximum: int, unit: str = "a whole number",
            lowest: str = "") -> int:
    """The value of option `name`, a whole number in [minimum, maximum]; `lowest` names the minimum's meaning."""
    try:
        value = int(str(opts.get(name, default)))
        if not minimum <= value <= maximum:
            raise ValueError
    except ValueError:
        raise ConfigError(f"--{name} needs {unit} from {minimum}{lowest} to {maximum}") from None
    return value


def check_listen_options(opts: Options, socket_activated: bool) -> None:
    """nbdkit refuses combinations where one way of listening would silently lose to another."""
    ways = {name for name in ("port", "unix", "single", "vsock", "fd") if opts.get(name) not in (None, False)}
    ways -= {"port"} if "vsock" in ways else set()  # --vsock listens on -p's port
    if len(ways) > 1 or (opts.flag("single") and opts.get("run") is not None):
        raise ConfigError("-p, --run, -s, -U, --vsock and --fd cannot be used in this combination")
    if socket_activated and (ways or opts.get("ipaddr") or opts.get("run") is not None):
        raise ConfigError("-i, -p, --run, -s, -U, --vsock and --fd cannot be used with socket activation")
    if opts.get("ipaddr") and (opts.get("unix") or opts.flag("vsock")):
        raise ConfigError("-i goes with TCP, not with -U or --vsock")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    # As nbdkit, Ctrl-C (SIGINT) stops the server even when it was started with SIGINT ignored:
    # a background job of a non-interactive shell inherits it so, and Python then installs no
    # handler (a long key derivation could not be interrupted).
    if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        return _main(argv)
    except ConfigError as e:
        print(f"nbdformats: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 1


def _main(argv: list[str]) -> int:
    opts = parse_argv(argv)
    filters = opts.items("filter")
    plugin_name = opts.positional[0] if opts.positional else None
    plugin_args = opts.positional[1:]
    for name in ("long-options", "short-options"):
        if opts.flag(name):
            print("\n".join(f"--{n}" for o in OPTIONS for n in o.names) if name == "long-options"
                  else "\n".join(f"-{o.short}" for o in OPTIONS if o.short))
            return 0
    if opts.flag("dump-config"):
        dump_config()
        return 0
    if opts.flag("version"):
        print_version(plugin_name, filters)
        return 0
    if opts.flag("list"):
        list_components()
        return 0
    if opts.flag("help"):
        print_help(plugin_name, filters)
        return 0
    if plugin_name is None:
        raise ConfigError(f"no plugin given\n{usage()}")
    if opts.flag("dump-plugin"):
        if any(opts.get(name) not in (None, False) for name in ("port", "run", "single", "unix", "vsock", "fd")):
            raise ConfigError("--dump-plugin cannot be used with -p, --run, -s, -U, --vsock or --fd")
        dump_plugin(plugin_name, filters, plugin_args)
        return 0
    absolute_paths(opts)
    return serve(opts, plugin_name, filters, plugin_args)


def serve(opts: Options, plugin_name: str, filters: list[str], plugin_args: list[str]) -> int:
    # As nbdkit: --exit-with-parent and socket activation imply -f (a daemon would lose its
    # parent, and systemd expects the service it started to stay in the foreground).
    socket_activated = os.environ.get("LISTEN_PID") == str(os.getpid())
    check_listen_options(opts, socket_activated)
    run_cmd = opts.text("run")
    foreground = opts.flag("foreground") or opts.flag("single") or run_cmd is not None \
        or opts.get("fd") is not None or opts.flag("exit-with-parent") or socket_activated
    # inetd and xinetd hand -s the client's socket as stderr too: messages there would corrupt
    # the NBD stream, so they go to syslog unless --log says otherwise.
    to_stderr = foreground and not (opts.flag("single") and stderr_is_stdin_socket())
    setup_logging(opts.flag("verbose"), str(opts.get("log", "stderr" if to_stderr else "syslog")))

    from .protocol.handshake import HandshakePolicy
    from .server.busypoll import DEFAULT_MAX_US
    from .server.listeners import ListenConfig, check_selinux_label, tls_context
    from .server.privileges import resolve_identity
    from .server.settings import ServerSettings

    identity = resolve_identity(opts.text("user"), opts.text("group"))
    if opts.get("selinux-label") is not None:
        check_selinux_label()
    tls_mode = str(opts.get("tls", "off"))
    if tls_mode not in ("off", "on", "require"):
        raise ConfigError("--tls must be off, on or require")
    threads = integer(opts, "threads", 16, 1, 1024)
    busy_poll_us = integer(opts, "busy-poll", DEFAULT_MAX_US, 0, 10_000, "microseconds", " (off)")
    try:
        handshake_timeout = float(str(opts.get("timeout", 60)))
        if not 0 < handshake_timeout <= 86400:
            raise ValueError
    except ValueError:
        raise ConfigError("--timeout needs seconds, more than 0 and at most 86400") from None
    fd = opts.get("fd")
    config = ListenConfig(
        unix_path=opts.text("unix"), port=opts.text("port"), vsock=opts.flag("vsock"),
        addresses=opts.items("ipaddr"),
        family=opts.number("family", socket.AF_UNSPEC),
        single=opts.flag("single"), fd=integer(opts, "fd", 0, 0, 1 << 20) if fd is not None else None,
        no_handshake=opts.flag("no-handshake"), exit_last=opts.flag("exit-last"),
        max_connections=integer(opts, "max-connections", 0, 0, 1 << 20), keepalive=opts.flag("keepalive"),
        selinux_label=opts.text("selinux-label"),
    )
    if config.no_handshake and config.fd is None:
        raise ConfigError("--no-handshake goes with --fd")
    if opts.flag("exit-with-parent"):
        exit_with_parent()
    if opts.flag("swap"):
        lock_memory_for_swap()
    context = None  # checked before the chain's possibly long start-up
    if tls_mode != "off":
        psk_file = opts.text("tls-psk")
        cert_dir = opts.text("tls-certificates")
        if psk_file is not None:  # as in nbdkit, PSK overrides X.509
            from .tls.psk import psk_context
            context = psk_context(psk_file)
        elif cert_dir is None:
            raise ConfigError("--tls needs --tls-certificates DIR or --tls-psk FILE")
        else:
            try:
                context = tls_context(cert_dir, opts.flag("tls-verify-peer"))
            except OSError as e:  # ssl.SSLError is an OSError
                raise ConfigError(f"cannot load TLS certificates from {cert_dir}: {e}") from None

    from .api.chain import set_stdio_in_use
    from .server.debugflags import parse_debug_flag
    debug_flags = [parse_debug_flag(text) for text in opts.items("debug")]
    set_stdio_in_use(config.single)  # before the components read their parameters (sh -, passphrase=-)
    chain = build_chain(plugin_name, filters, plugin_args, debug_flags)
    # Before get_ready: start-up work (a gzip index pass reads 256 KiB at a time) allocates the
    # same buffers the server does, and with glibc's defaults each is a fresh mmap to fault in.
    # What the start-up work freed then goes back to the kernel (tune_malloc keeps 256 MiB).
    from .server.budget import return_free_memory
    from .server.listeners import tune_malloc
    tune_malloc()
    try:
        chain.get_ready()
    except ConfigError:
        raise
    except OSError as e:
        raise ConfigError(f"{plugin_name}: {e}") from None
    return_free_memory()

    settings = ServerSettings(
        chain=chain, readonly=opts.flag("readonly"), tls=tls_mode, tls_context=context,
        oldstyle=opts.flag("oldstyle"), threads=threads, busy_poll_us=busy_poll_us,
        handshake_timeout=handshake_timeout, description=str(opts.get("description", "")),
        handshake_policy=HandshakePolicy(
            global_flags=parse_mask(str(opts.get("mask-handshake", "3"))),
            structured_replies=not opts.flag("no-sr"), meta_contexts=not opts.flag("no-mc")),
    )
    open_stats_file(opts, settings)

    # From here on a private socket directory exists: it goes, whatever happens.
    private_dir = None
    if config.unix_path == "-" or (run_cmd is not None and not (config.unix_path or config.port or config.vsock)):
        private_dir = tempfile.mkdtemp(prefix="nbdformats-")
        config.unix_path = os.path.join(private_dir, "socket")
    try:
        return _listen_and_serve(opts, settings, config, identity, run_cmd, private_dir, foreground)
    finally:
        if settings.stats is not None:
            settings.stats.close()
        chain.cleanup()
        if private_dir:
            shutil.rmtree(private_dir, ignore_errors=True)


def _listen_and_serve(opts: Options, settings, config, identity, run_cmd: str | None, private_dir: str | None,
                      foreground: bool) -> int:
    from .server.listeners import make_listeners
    from .server.privileges import drop_privileges

    listeners = []
    if not (config.single or config.fd is not None):
        try:
            listeners = make_listeners(config)
        except OSError as e:
            raise ConfigError(e.strerror or str(e)) from None
    export = str(opts.get("exportname", ""))
    first_address = config.addresses[0] if config.addresses else None
    uri = make_uri(config.unix_path, config.port, first_address, export, settings.tls == "require", config.vsock)
    if opts.flag("print-uri"):
        print(uri, flush=True)
    # As nbdkit: the --run command starts before privileges are dropped, so it runs as the caller.
    captive = None
    if run_cmd is not None:
        env = dict(os.environ, uri=uri, nbd=uri, exportname=export, unixsocket=config.unix_path or "",
                   port=config.port or ("" if config.unix_path else "10809"))
        if settings.tls != "off":  # as nbdkit: $tls is 1 (on) or 2 (require), and left alone without TLS
            env["tls"] = "2" if settings.tls == "require" else "1"
        captive = subprocess.Popen(["/bin/sh", "-c", run_cmd], env=env)
    if identity is not None:
        if private_dir:  # so that the server can still remove it when it exits
            os.chown(private_dir, -1 if identity.uid is None else identity.uid,
                     -1 if identity.gid is None else identity.gid)
        try:
            drop_privileges(identity)
        except ConfigError:
            if captive is not None:
                captive.kill()
                captive.wait()
            raise
    if not foreground:
        daemonize()
    pidfile = opts.text("pidfile")
    if pidfile is not None:
        write_pidfile(pidfile)
    return asyncio.run(_serve(settings, config, listeners, captive))


async def _serve(settings, config, listeners, captive: subprocess.Popen | None) -> int:
    from .server.listeners import Server, install_signal_handlers

    server = Server(settings, config)
    await server.start(listeners)
    assert server.stopped is not None
    if settings.stats is not None:
        chain = settings.chain
        settings.stats.start(asyncio.get_running_loop(), version=__version__, plugin=chain.plugin.name,
                             filters=[f.name for f in chain.filters], readonly=settings.readonly)
    install_signal_handlers(server)
    status = 0
    if captive is not None:
        waiter = asyncio.get_running_loop().run_in_executor(None, captive.wait)
        await asyncio.wait([waiter, server.stopped], return_when=asyncio.FIRST_COMPLETED)
        if waiter.done():
            status = waiter.result()
            status = 128 - status if status < 0 else status
        else:
            captive.terminate()
            await waiter
            status = 1
    else:
        await server.stopped
    await server.close()
    return status


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
