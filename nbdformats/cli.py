"""The command line, compatible with nbdkit's:

    nbdformats [OPTIONS] [--filter=NAME ...] PLUGIN [[KEY=]VALUE ...]

Options and key=value arguments may be mixed as with GNU getopt; `--` ends options.
Filters are listed outermost (nearest the client) first.  Each key=value goes to the
first filter that declares the key, else to the plugin; a bare VALUE goes to the plugin's
"magic" parameter (e.g. `file DISK`, `memory 1G`).
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import logging.handlers
import os
import shutil
import signal
import stat
import sys
import tempfile
from dataclasses import dataclass, field
from urllib.parse import quote

from . import __version__
from .api.errors import ConfigError

log = logging.getLogger("nbdformats")

USAGE = """\
usage: nbdformats [-D PLUGIN.FLAG=N] [-e EXPORTNAME] [--exit-with-parent] [-f]
                  [--filter=FILTER ...] [-g GROUP] [-i IPADDR] [-4|-6]
                  [--log=stderr|syslog|null] [--max-connections N] [--exit-last]
                  [-o|--oldstyle] [-P PIDFILE] [-p PORT] [--print-uri] [-r]
                  [--run CMD] [-s] [--stats-json PATH [--stats-interval SECONDS]]
                  [-t THREADS] [--busy-poll US] [--tls=off|on|require]
                  [--tls-certificates DIR] [--tls-verify-peer] [-U SOCKET|-]
                  [--fd N [--no-handshake]] [-v] [-V]
                  PLUGIN [[KEY=]VALUE ...]

       nbdformats --list                 plugins and filters available
       nbdformats PLUGIN --help          the plugin's parameters
       nbdformats --dump-plugin PLUGIN   the plugin's details, machine readable
"""

# name -> (takes a value, destination); short options map to the same names.
_LONG = {
    "foreground": False, "no-fork": False, "readonly": False, "read-only": False, "port": True, "ipaddr": True,
    "ipv4-only": False, "ipv6-only": False, "unix": True, "single": False, "stdin": False, "run": True,
    "exportname": True, "export-name": True, "export": True, "threads": True, "pidfile": True,
    "exit-with-parent": False, "tls": True, "tls-certificates": True, "tls-psk": True, "tls-verify-peer": False,
    "verbose": False, "debug": True, "filter": True, "oldstyle": False, "newstyle": False, "print-uri": False,
    "dump-plugin": False, "dump-config": False, "help": False, "version": False, "list": False,
    "exit-last": False, "max-connections": True, "fd": True, "no-handshake": False, "log": True,
    "handshake-timeout": True, "description": True, "swap": False, "user": True, "group": True,
    "mask-handshake": True, "no-sr": False, "no-mc": False, "keepalive": False, "selinux-label": True,
    "time-limit": True, "vsock": False, "stats-json": True, "stats-interval": True, "busy-poll": True,
}
_SHORT = {"f": "foreground", "r": "readonly", "p": "port", "i": "ipaddr", "4": "ipv4-only", "6": "ipv6-only",
          "U": "unix", "s": "single", "e": "exportname", "t": "threads", "P": "pidfile", "v": "verbose",
          "D": "debug", "o": "oldstyle", "n": "newstyle", "V": "version", "h": "help", "u": "user",
          "g": "group"}
_REPEATABLE = {"filter", "ipaddr", "debug"}


@dataclass
class Options:
    values: dict[str, object] = field(default_factory=dict)
    positional: list[str] = field(default_factory=list)

    def get(self, name: str, default: object = None) -> object:
        return self.values.get(name, default)

    def flag(self, name: str) -> bool:
        return bool(self.values.get(name))


def parse_argv(argv: list[str]) -> Options:
    opts = Options()
    i = 0

    def store(name: str, value: object) -> None:
        if name in _REPEATABLE:
            opts.values.setdefault(name, []).append(value)  # type: ignore[union-attr]
        else:
            opts.values[name] = value

    while i < len(argv):
        arg = argv[i]
        i += 1
        if arg == "--":
            opts.positional += argv[i:]
            break
        if arg.startswith("--"):
            name, eq, value = arg[2:].partition("=")
            if name not in _LONG:
                raise ConfigError(f"unknown option --{name}\n{USAGE}")
            if _LONG[name]:
                if not eq:
                    if i >= len(argv):
                        raise ConfigError(f"--{name} needs a value")
                    value = argv[i]
                    i += 1
                store(name, value)
            else:
                if eq:
                    raise ConfigError(f"--{name} takes no value")
                store(name, True)
            continue
        if arg.startswith("-") and len(arg) > 1 and "=" not in arg:
            j = 1
            while j < len(arg):
                letter = arg[j]
                name = _SHORT.get(letter)
                if name is None:
                    raise ConfigError(f"unknown option -{letter}\n{USAGE}")
                if _LONG[name]:
                    value = arg[j + 1:]
                    if not value:
                        if i >= len(argv):
                            raise ConfigError(f"-{letter} needs a value")
                        value = argv[i]
                        i += 1
                    store(name, value)
                    break
                store(name, True)
                j += 1
            continue
        opts.positional.append(arg)
    return opts


def _normalise(opts: Options) -> None:
    aliases = {"no-fork": "foreground", "read-only": "readonly", "stdin": "single", "export-name": "exportname",
               "export": "exportname"}
    for alias, name in aliases.items():
        if alias in opts.values:
            opts.values[name] = opts.values.pop(alias)


def build_chain(plugin_name: str, filter_names: list[str], args: list[str], debug_flags: list | None = None):
    """Load, configure and ready the plugin and filters from PLUGIN [[KEY=]VALUE ...]."""
    from .api.chain import Chain
    from .server.debugflags import apply_debug_flags
    from .registry import load_filter, load_plugin

    plugin_cls = load_plugin(plugin_name)
    filter_classes = [load_filter(name) for name in filter_names]
    pairs = assign_args(plugin_name, [*filter_classes, plugin_cls], args)
    chain = Chain([cls() for cls in filter_classes], plugin_cls())
    # As nbdkit sets debug variables when it loads a plugin: before configuring.
    for warning in apply_debug_flags([*chain.filters, chain.plugin], debug_flags or []):
        log.warning("%s", warning)
    chain.configure(pairs)
    return chain


def assign_args(plugin_name: str, components: list, args: list[str]) -> dict[int, list[tuple[str, str]]]:
    """key=value pairs per component (filters first, the plugin last) from [[KEY=]VALUE ...]."""
    from .api.params import magic_param, params_of

    plugin_cls = components[-1]
    declared = [{p.key for p in params_of(cls)} for cls in components]
    pairs: dict[int, list[tuple[str, str]]] = {}
    for arg in args:
        key, eq, value = arg.partition("=")
        if not eq or not key or "/" in key or key.startswith("."):
            # A bare value (or a path containing '='): the plugin's magic parameter.
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
                                  f"see 'nbdformats {plugin_name} --help')")
        pairs.setdefault(index, []).append((key, value))
    return pairs


def print_help(plugin_name: str | None, filter_names: list[str]) -> None:
    from .api.params import describe_params
    from .registry import load_filter, load_plugin

    if plugin_name is None:
        print(USAGE)
        return
    for name in filter_names:
        cls = load_filter(name)
        print(f"filter {cls.name}: {cls.summary()}\n{describe_params(cls)}{describe_debug_flags(cls)}\n")
    cls = load_plugin(plugin_name)
    print(f"plugin {cls.name}: {cls.summary()}\n{describe_params(cls)}{describe_debug_flags(cls)}")


def describe_debug_flags(cls) -> str:
    if not cls.debug_flag_help:
        return ""
    return "\n  debug flags (-D NAME.FLAG=N):\n" + "\n".join(
        f"    -D {cls.name}.{flag}=N  {text}" for flag, text in sorted(cls.debug_flag_help.items()))


def dump_plugin(plugin_name: str, args: list[str]) -> None:
    """nbdkit's --dump-plugin: the core's lines, then the plugin's own (its dump_plugin()).

    As nbdkit, the arguments are parsed (nbdkit calls .config) but config_complete does not
    run: `--dump-plugin python script.py` loads the script and prints its dump_plugin too.
    """
    import contextlib
    import io

    from .api.params import apply_params, params_of
    from .registry import load_plugin

    cls = load_plugin(plugin_name)
    plugin = cls()
    if args:
        apply_params(plugin, assign_args(plugin_name, [cls], args).get(0, []), cls.name)
    # The plugin's lines come last but may change what the first ones say (a script's thread model).
    own_lines = io.StringIO()
    with contextlib.redirect_stdout(own_lines):
        plugin.dump_plugin()
    module = sys.modules.get(cls.__module__)  # a plugin loaded by path is not in sys.modules
    print(f"path={getattr(module, '__file__', None) or os.path.abspath(plugin_name)}")
    print(f"name={cls.name}")
    print(f"version={__version__}")
    print("api_version=2")
    print(f"thread_model={plugin.thread_model.name.lower()}")
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
    """The plugin or filter a logger belongs to: nbdformats.luks, nbdformats.filters.luks.header
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
    level = logging.DEBUG if verbose else logging.INFO
    root = logging.getLogger("nbdformats")
    root.setLevel(level)
    root.handlers.clear()
    if destination == "null":
        root.addHandler(logging.NullHandler())
    elif destination == "syslog":
        handler = logging.handlers.SysLogHandler(address="/dev/log") if os.path.exists("/dev/log") \
            else logging.NullHandler()
        handler.setFormatter(ComponentFormatter("nbdformats", with_pid=True))
        root.addHandler(handler)
    else:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(ComponentFormatter("nbdformats"))
        root.addHandler(handler)
    root.propagate = False


def open_stats_file(opts: Options, settings) -> None:
    """--stats-json PATH [--stats-interval SECONDS]: open the file now, so errors reach the terminal."""
    path = opts.get("stats-json")
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
        settings.stats = StatsRecorder.open(os.path.abspath(str(path)), interval,
                                            connections=lambda: len(settings.connections))
    except OSError as e:
        raise ConfigError(f"--stats-json: cannot write {path}: {e.strerror}") from None


def stderr_is_stdin_socket() -> bool:
    try:
        stdin, stderr = os.fstat(0), os.fstat(2)
    except OSError:
        return False
    return stat.S_ISSOCK(stdin.st_mode) and (stdin.st_dev, stdin.st_ino) == (stderr.st_dev, stderr.st_ino)


def exit_with_parent() -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    PR_SET_PDEATHSIG = 1
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) != 0:
        raise ConfigError("--exit-with-parent is not supported here")


def lock_memory_for_swap() -> None:
    """--swap: do not let the kernel swap us out or OOM-kill us while we serve swap."""
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


def make_uri(unix_path: str | None, port: str | None, address: str | None, export: str, tls: bool) -> str:
    scheme = "nbds" if tls else "nbd"
    path = quote(export, safe="")
    if unix_path:
        return f"{scheme}+unix:///{path}?socket={quote(unix_path, safe='/')}"
    host = address or "localhost"
    if ":" in host:
        host = f"[{host}]"
    port_part = "" if (port or "10809") == "10809" else f":{port}"
    return f"{scheme}://{host}{port_part}/{path}"


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


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        return _main(argv)
    except ConfigError as e:
        print(f"nbdformats: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 1


def _main(argv: list[str]) -> int:
    opts = parse_argv(argv)
    _normalise(opts)
    if opts.flag("version"):
        print(f"nbdformats {__version__}")
        return 0
    if opts.flag("list"):
        list_components()
        return 0
    filters: list[str] = list(opts.get("filter", []))  # type: ignore[arg-type]
    plugin_name = opts.positional[0] if opts.positional else None
    plugin_args = opts.positional[1:]
    if opts.flag("help"):
        print_help(plugin_name, filters)
        return 0
    if plugin_name is None:
        raise ConfigError(f"no plugin given\n{USAGE}")
    if opts.flag("dump-plugin"):
        dump_plugin(plugin_name, plugin_args)
        return 0

    # As nbdkit: --exit-with-parent and socket activation imply -f (a daemon would lose its
    # parent, and systemd expects the service it started to stay in the foreground).
    socket_activated = os.environ.get("LISTEN_PID") == str(os.getpid())
    foreground = opts.flag("foreground") or opts.flag("single") or opts.get("run") is not None \
        or opts.get("fd") is not None or opts.flag("exit-with-parent") or socket_activated
    # inetd and xinetd hand -s the client's socket as stderr too: messages there would corrupt
    # the NBD stream, so they go to syslog unless --log says otherwise.
    to_stderr = foreground and not (opts.flag("single") and stderr_is_stdin_socket())
    setup_logging(opts.flag("verbose"), str(opts.get("log", "stderr" if to_stderr else "syslog")))
    if opts.flag("exit-with-parent"):
        exit_with_parent()
    if opts.flag("swap"):
        lock_memory_for_swap()

    from .server.debugflags import parse_debug_flag
    debug_flags = [parse_debug_flag(str(text)) for text in opts.get("debug", [])]  # type: ignore[union-attr]
    chain = build_chain(plugin_name, filters, plugin_args, debug_flags)
    try:
        chain.get_ready()
    except ConfigError:
        raise
    except OSError as e:
        raise ConfigError(f"{plugin_name}: {e}") from None

    from .server.busypoll import DEFAULT_MAX_US
    from .server.settings import ServerSettings
    from .server.listeners import ListenConfig, make_listeners, tls_context, tune_malloc, use_fast_event_loop

    tls_mode = str(opts.get("tls", "off"))
    if tls_mode not in ("off", "on", "require"):
        raise ConfigError("--tls must be off, on or require")
    context = None
    if tls_mode != "off":
        psk_file = opts.get("tls-psk")
        cert_dir = opts.get("tls-certificates")
        if psk_file is not None:  # as in nbdkit, PSK overrides X.509
            from .tls.psk import psk_context
            context = psk_context(str(psk_file))
        elif cert_dir is None:
            raise ConfigError("--tls needs --tls-certificates DIR or --tls-psk FILE")
        else:
            try:
                context = tls_context(str(cert_dir), opts.flag("tls-verify-peer"))
            except OSError as e:  # ssl.SSLError is an OSError
                raise ConfigError(f"cannot load TLS certificates from {cert_dir}: {e}") from None

    run_cmd = opts.get("run")
    unix_path = opts.get("unix")
    private_dir = None
    if unix_path == "-":
        private_dir = tempfile.mkdtemp(prefix="nbdformats-")
        unix_path = os.path.join(private_dir, "socket")
    if run_cmd is not None and unix_path is None and opts.get("port") is None:
        private_dir = tempfile.mkdtemp(prefix="nbdformats-")
        unix_path = os.path.join(private_dir, "socket")
    family = 0
    if opts.flag("ipv4-only"):
        import socket as _socket
        family = _socket.AF_INET
    elif opts.flag("ipv6-only"):
        import socket as _socket
        family = _socket.AF_INET6
    fd = opts.get("fd")
    config = ListenConfig(
        unix_path=str(unix_path) if unix_path else None,
        port=str(opts.get("port")) if opts.get("port") is not None else None,
        addresses=list(opts.get("ipaddr", [])),  # type: ignore[arg-type]
        family=family,
        single=opts.flag("single"),
        fd=int(str(fd)) if fd is not None else None,
        no_handshake=opts.flag("no-handshake"),
        exit_last=opts.flag("exit-last"),
        max_connections=int(str(opts.get("max-connections", 0))),
    )
    if config.no_handshake and config.fd is None:
        raise ConfigError("--no-handshake goes with --fd")
    try:
        threads = int(str(opts.get("threads", 16)))
    except ValueError:
        raise ConfigError("-t needs a number") from None
    try:
        busy_poll_us = int(str(opts.get("busy-poll", DEFAULT_MAX_US)))
        if not 0 <= busy_poll_us <= 10_000:
            raise ValueError
    except ValueError:
        raise ConfigError("--busy-poll needs microseconds from 0 (off) to 10000") from None
    settings = ServerSettings(
        chain=chain, readonly=opts.flag("readonly"), tls=tls_mode, tls_context=context,
        oldstyle=opts.flag("oldstyle"), threads=max(1, threads), busy_poll_us=busy_poll_us,
        handshake_timeout=float(str(opts.get("handshake-timeout", 60))),
        description=str(opts.get("description", "")),
    )
    open_stats_file(opts, settings)
    listeners = []
    if not (config.single or config.fd is not None):
        try:
            listeners = make_listeners(config)
        except OSError as e:
            raise ConfigError(str(e)) from None

    export = str(opts.get("exportname", ""))
    first_address = config.addresses[0] if config.addresses else None
    uri = make_uri(config.unix_path, config.port, first_address, export, tls_mode != "off")
    if opts.flag("print-uri"):
        print(uri, flush=True)

    if not foreground:
        daemonize()
    pidfile = opts.get("pidfile")
    if pidfile is not None:
        with open(str(pidfile), "w") as f:
            f.write(f"{os.getpid()}\n")

    use_fast_event_loop()
    tune_malloc()
    try:
        return asyncio.run(_serve(settings, config, listeners, run_cmd, uri, export))
    finally:
        if settings.stats is not None:
            settings.stats.close()
        chain.cleanup()
        if private_dir:
            shutil.rmtree(private_dir, ignore_errors=True)
        elif config.unix_path and os.path.exists(config.unix_path) and not config.single:
            try:
                os.unlink(config.unix_path)
            except OSError:
                pass
        if pidfile is not None:
            try:
                os.unlink(str(pidfile))
            except OSError:
                pass


async def _serve(settings, config, listeners, run_cmd, uri: str, export: str) -> int:
    from .server.listeners import Server, install_signal_handlers

    server = Server(settings, config)
    await server.start(listeners)
    if settings.stats is not None:
        chain = settings.chain
        settings.stats.start(asyncio.get_running_loop(), version=__version__, plugin=chain.plugin.name,
                             filters=[f.name for f in chain.filters], readonly=settings.readonly)
    install_signal_handlers(server)
    status = 0
    if run_cmd is not None:
        env = dict(os.environ, uri=uri, nbd=uri, exportname=export,
                   unixsocket=config.unix_path or "", port=config.port or ("" if config.unix_path else "10809"),
                   tls="1" if settings.tls != "off" else "0")
        process = await asyncio.create_subprocess_shell(str(run_cmd), env=env)
        waiter = asyncio.ensure_future(process.wait())
        await asyncio.wait([waiter, server.stopped], return_when=asyncio.FIRST_COMPLETED)
        if waiter.done():
            status = waiter.result()
            status = 128 - status if status < 0 else status
        else:
            process.terminate()
            status = await process.wait()
            status = 1
    else:
        await server.stopped
    await server.close()
    return status


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
