#!/usr/bin/env bash
# tests/ceph/up.sh - a throw-away single-node Ceph for the s3 and rbd tests.
#
#   tests/ceph/up.sh [up]     start (installing Debian's packages if needed); prints KEY=VALUE lines
#   tests/ceph/up.sh down     stop the daemons
#   tests/ceph/up.sh reset    stop, wipe the state, start from scratch
#   tests/ceph/up.sh status   exit 0 when every daemon is running
#
# One mon, one mgr, one OSD (BlueStore on a sparse file), radosgw (S3), cephx, all on 127.0.0.1,
# no systemd, every file under $NBDF_CEPH_DIR.  Idempotent and quick when already running: it
# only starts what is not running and creates what is missing.  On success stdout is the
# environment a client needs (CEPH_CONF, the S3 endpoint and keys, the RBD pool); logs go to stderr.
set -euo pipefail

DIR=${NBDF_CEPH_DIR:-/tmp/nbdformats-ceph}
MON_PORT=${NBDF_CEPH_MON_PORT:-3300}          # messenger v2
MON_PORT_V1=${NBDF_CEPH_MON_PORT_V1:-6789}    # legacy messenger, for old clients
RGW_PORT=${NBDF_CEPH_RGW_PORT:-7480}
RBD_POOL=${NBDF_CEPH_RBD_POOL:-rbd}
S3_ACCESS=${NBDF_CEPH_S3_ACCESS:-nbdformats-access}
S3_SECRET=${NBDF_CEPH_S3_SECRET:-nbdformats-secret-key}
OSD_FILE_SIZE=${NBDF_CEPH_OSD_SIZE:-4G}       # sparse: costs only what is written

# python3-boto3: nbdkit's S3 plugin, the reference the S3 tests compare with, imports it.
PACKAGES=(ceph-mon ceph-mgr ceph-osd ceph-common radosgw python3-rados python3-rbd python3-boto3 uuid-runtime curl)
DAEMONS=(mon.a mgr.a osd.0 client.rgw.a)

export CEPH_CONF=$DIR/ceph.conf
say() { printf '[ceph-up %s] %s\n' "$(date +%T)" "$*" >&2; }
die() { say "$*"; exit 1; }
quiet() { local out; out=$("$@" 2>&1) || { echo "$out" >&2; return 1; }; }  # output only on failure

pidfile() { echo "$DIR/run/$1.pid"; }
running() {  # running NAME: its pid file names a live Ceph daemon (not a recycled pid)
  local file pid
  file=$(pidfile "$1"); [[ -s $file ]] || return 1
  pid=$(<"$file")
  [[ $(cat "/proc/$pid/comm" 2>/dev/null) =~ ^(ceph-mon|ceph-mgr|ceph-osd|radosgw)$ ]]
}

stop_all() {
  local name pid pids=()
  for name in "${DAEMONS[@]}"; do
    if running "$name"; then pid=$(<"$(pidfile "$name")"); pids+=("$pid"); say "stopping $name ($pid)"; kill "$pid"; fi
  done
  for _ in $(seq 100); do
    local alive=0
    for pid in "${pids[@]}"; do kill -0 "$pid" 2>/dev/null && alive=1; done
    ((alive)) || break
    sleep 0.1
  done
  for pid in "${pids[@]}"; do kill -0 "$pid" 2>/dev/null && kill -9 "$pid"; done
  rm -f "$DIR"/run/*.pid
}

# wait_for SECONDS DESCRIPTION COMMAND...: poll every 0.25 s
wait_for() {
  local seconds=$1 what=$2; shift 2
  local tries=$((seconds * 4))
  while ((tries-- > 0)); do "$@" >/dev/null 2>&1 && return 0; sleep 0.25; done
  die "$what did not come up in ${seconds}s (logs in $DIR/log)"
}

all_running() { local n; for n in "${DAEMONS[@]}"; do running "$n" || return 1; done; }

case ${1:-up} in
  status) all_running; exit ;;
  down) stop_all; exit 0 ;;
  reset) stop_all; rm -rf "$DIR" ;;
  up) ;;
  *) echo "usage: $0 [up|down|reset|status]" >&2; exit 2 ;;
esac

print_env() {
  cat <<EOF
CEPH_CONF=$CEPH_CONF
CEPH_KEYRING=$DIR/keys/client.admin.keyring
NBDF_CEPH_RBD_POOL=$RBD_POOL
NBDF_CEPH_S3_ENDPOINT=http://127.0.0.1:$RGW_PORT
NBDF_CEPH_S3_ACCESS=$S3_ACCESS
NBDF_CEPH_S3_SECRET=$S3_SECRET
EOF
}

# Fast path: everything already up and answering.
if all_running && [[ -s $DIR/.ready ]] && timeout 10 ceph --connect-timeout 5 health >/dev/null 2>&1 \
   && curl -fsS -o /dev/null "http://127.0.0.1:$RGW_PORT/"; then
  print_env; exit 0
fi

# ---- Debian packages ----------------------------------------------------------------------
missing=()
for pkg in "${PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if ((${#missing[@]})); then
  say "installing ${missing[*]}"
  [[ $(id -u) == 0 ]] && SUDO=() || SUDO=(sudo)
  "${SUDO[@]}" apt-get update -qq
  "${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

mkdir -p "$DIR"/{run,log,keys,crash,mon.a,mgr.a,osd.0,rgw.a}
rm -f "$DIR/.ready"
[[ -s $DIR/fsid ]] || uuidgen >"$DIR/fsid"

# Pools of size 1 on one OSD, few PGs, no autoscaler: a test cluster, not a production one.
cat >"$CEPH_CONF" <<EOF
[global]
fsid = $(<"$DIR/fsid")
mon host = [v2:127.0.0.1:$MON_PORT,v1:127.0.0.1:$MON_PORT_V1]
public network = 127.0.0.1/32
auth cluster required = cephx
auth service required = cephx
auth client required = cephx
auth allow insecure global id reclaim = false
keyring = $DIR/keys/\$name.keyring
run dir = $DIR/run
pid file = $DIR/run/\$name.pid
log file = $DIR/log/\$name.log
mon cluster log file = $DIR/log/cluster.log
crash dir = $DIR/crash
osd pool default size = 1
osd pool default min size = 1
osd pool default pg num = 8
osd pool default pgp num = 8
osd pool default pg autoscale mode = off
osd crush chooseleaf type = 0
mon allow pool size one = true
mon allow pool delete = true
mon max pg per osd = 500
mon warn on pool no redundancy = false
mon data avail warn = 2
mon data avail crit = 1

[mon]
admin socket = $DIR/run/\$name.asok
mon data = $DIR/mon.a
# ceph-mon --mkfs keeps the mon. key in its data directory.
keyring = $DIR/mon.a/keyring

[mgr]
admin socket = $DIR/run/\$name.asok
mgr data = $DIR/mgr.a

[osd]
admin socket = $DIR/run/\$name.asok
osd data = $DIR/osd.0
osd objectstore = bluestore
bluestore block create = true
bluestore block size = $(numfmt --from=iec "$OSD_FILE_SIZE")
bluestore fsck on mount = false
osd memory target = 1073741824

[client.rgw.a]
admin socket = $DIR/run/\$name.asok
rgw data = $DIR/rgw.a
# Without TCP_NODELAY small GETs wait for delayed ACKs (~40 ms each instead of a few).
rgw frontends = beast endpoint=127.0.0.1:$RGW_PORT tcp_nodelay=1
EOF

# ---- monitor ----------------------------------------------------------------------------------
if [[ ! -e $DIR/mon.a/.made ]]; then
  say "creating the monitor"
  rm -rf "$DIR/mon.a" && mkdir -p "$DIR/mon.a"
  admin=$DIR/keys/client.admin.keyring
  ceph-authtool --create-keyring "$admin" --gen-key -n client.admin \
    --cap mon 'allow *' --cap osd 'allow *' --cap mgr 'allow *' --cap mds 'allow *' >/dev/null
  ceph-authtool --create-keyring "$DIR/keys/mon..keyring" --gen-key -n mon. --cap mon 'allow *' >/dev/null
  ceph-authtool "$DIR/keys/mon..keyring" --import-keyring "$admin" >/dev/null
  monmaptool --create --clobber --fsid "$(<"$DIR/fsid")" \
    --addv a "[v2:127.0.0.1:$MON_PORT,v1:127.0.0.1:$MON_PORT_V1]" "$DIR/monmap" >/dev/null
  ceph-mon --mkfs -i a --monmap "$DIR/monmap" --keyring "$DIR/keys/mon..keyring"
  touch "$DIR/mon.a/.made"
fi
port_taken() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
if ! running mon.a; then
  for port in "$MON_PORT" "$MON_PORT_V1"; do
    port_taken "$port" && die "port $port is taken (another Ceph?): choose NBDF_CEPH_MON_PORT / NBDF_CEPH_MON_PORT_V1"
  done
  say "starting mon.a"; ceph-mon -i a 2>>"$DIR/log/daemons.log"
fi
wait_for 30 "the monitor" timeout 10 ceph --connect-timeout 5 mon stat

# ---- manager ----------------------------------------------------------------------------------
[[ -s $DIR/keys/mgr.a.keyring ]] ||
  ceph auth get-or-create mgr.a mon 'allow profile mgr' osd 'allow *' mds 'allow *' -o "$DIR/keys/mgr.a.keyring"
running mgr.a || { say "starting mgr.a"; ceph-mgr -i a 2>>"$DIR/log/daemons.log"; }

# ---- OSD: BlueStore on a sparse file --------------------------------------------------------
if [[ ! -e $DIR/osd.0/.made ]]; then
  say "creating osd.0"
  rm -rf "$DIR/osd.0" && mkdir -p "$DIR/osd.0"
  # An osd.0 left by an interrupted earlier attempt would make `osd new` hand out id 1.
  ceph osd ls | grep -qx 0 && ceph osd purge 0 --yes-i-really-mean-it
  key=$(ceph-authtool --gen-print-key)
  uuid=$(uuidgen)
  echo "{\"cephx_secret\": \"$key\"}" >"$DIR/osd-secret.json"
  id=$(ceph osd new "$uuid" -i "$DIR/osd-secret.json")
  rm -f "$DIR/osd-secret.json"
  [[ $id == 0 ]] || die "the monitor gave the new OSD id $id, expected 0"
  ceph-authtool --create-keyring "$DIR/keys/osd.0.keyring" -n osd.0 --add-key "$key" >/dev/null
  ceph-osd -i 0 --mkfs --osd-uuid "$uuid" >"$DIR/log/osd-mkfs.log" 2>&1 || die "ceph-osd --mkfs failed: $DIR/log/osd-mkfs.log"
  touch "$DIR/osd.0/.made"
fi
running osd.0 || { say "starting osd.0"; ceph-osd -i 0 2>>"$DIR/log/daemons.log"; }
# This OSD process is active (its admin socket says so) and the osdmap has it up.  The map alone
# is not enough after a restart: it still shows the previous incarnation as up for a moment.
osd_ready() {
  ceph --admin-daemon "$DIR/run/osd.0.asok" status | grep -q '"state": "active"' &&
    [[ $(ceph osd stat -f json | /usr/bin/python3 -c 'import json,sys; print(json.load(sys.stdin)["num_up_osds"])') == 1 ]]
}
wait_for 60 "osd.0" osd_ready

# ---- RBD pool ---------------------------------------------------------------------------------
if ! ceph osd pool ls | grep -qx "$RBD_POOL"; then
  say "creating pool $RBD_POOL"
  quiet ceph osd pool create "$RBD_POOL"
  rbd pool init "$RBD_POOL"
fi

# ---- radosgw ----------------------------------------------------------------------------------
[[ -s $DIR/keys/client.rgw.a.keyring ]] ||
  ceph auth get-or-create client.rgw.a mon 'allow rw' osd 'allow rwx' mgr 'allow rw' -o "$DIR/keys/client.rgw.a.keyring"
# radosgw makes its pools on first use, stalling that request for seconds: make them now.
for pool in .rgw.root default.rgw.log default.rgw.control default.rgw.meta \
            default.rgw.buckets.index default.rgw.buckets.data default.rgw.buckets.non-ec; do
  # In parallel: each creation waits for a new osdmap, about 2 s.
  ceph osd pool ls | grep -qx -- "$pool" ||
    { quiet ceph osd pool create "$pool" && quiet ceph osd pool application enable "$pool" rgw; } &
done
wait_all() { local pid; for pid in $(jobs -p); do wait "$pid" || return 1; done; }
wait_all || die "could not create the radosgw pools"
if ! running client.rgw.a; then
  port_taken "$RGW_PORT" && die "port $RGW_PORT is taken: choose NBDF_CEPH_RGW_PORT"
  say "starting radosgw"; radosgw -n client.rgw.a 2>>"$DIR/log/daemons.log"
fi
wait_for 60 "radosgw" curl -fsS -o /dev/null "http://127.0.0.1:$RGW_PORT/"
if ! radosgw-admin user info --uid=nbdformats >/dev/null 2>&1; then
  say "creating the S3 user"
  radosgw-admin user create --uid=nbdformats --display-name="nbdformats tests" \
    --access-key="$S3_ACCESS" --secret-key="$S3_SECRET" >/dev/null
fi

echo ok >"$DIR/.ready"
say "ready: $(ceph health)"
print_env
