#!/bin/sh
# Podium's test app: busybox httpd serving, on $PORT (default 8080):
#   /                 the pod name ($POD_NAME, else the hostname, which is the pod name)
#   /healthz          200 while /tmp/www/healthz exists, else 404 (point the readiness probe here)
#   /cgi-bin/fail     removes healthz, so the readiness probe starts failing
#   /cgi-bin/heal     puts it back
#   /cgi-bin/labels   the Downward API labels file, $PODINFO/labels (default /etc/podinfo)
# On SIGTERM or SIGINT it waits $STOP_DELAY seconds (default 0), stops httpd and exits 0.
set -u
WWW=/tmp/www
mkdir -p "$WWW"
cp -r /app/www/. "$WWW/"
echo "${POD_NAME:-$(hostname)}" > "$WWW/index.html"
echo ok > "$WWW/healthz"
httpd -f -p "${PORT:-8080}" -h "$WWW" &
child=$!
# shellcheck disable=SC2317 # called from the traps below
stop() {
  echo "podium-app: $1, stopping in ${STOP_DELAY:-0}s"
  sleep "${STOP_DELAY:-0}"
  kill "$child" 2>/dev/null
  wait "$child" 2>/dev/null
  exit 0
}
trap 'stop SIGTERM' TERM
trap 'stop SIGINT' INT
echo "podium-app: serving ${POD_NAME:-$(hostname)} on :${PORT:-8080}"
wait "$child"
echo "podium-app: httpd exited"
exit 1
