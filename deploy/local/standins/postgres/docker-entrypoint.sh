#!/usr/bin/env bash
# Entrypoint of the local postgres stand-in; follows the official postgres image's contract.
#   POSTGRES_USER (default postgres), POSTGRES_PASSWORD or POSTGRES_PASSWORD_FILE (required),
#   POSTGRES_DB (default: the user), POSTGRES_INITDB_ARGS, PGDATA, PGPORT.
# Runs as root only to prepare the data directory, then re-executes itself as postgres (uid 999)
# and execs the server, so postgres is PID 1 and logs to stderr.
set -Eeuo pipefail

# file_env VAR [DEFAULT]: VAR from the environment or from the file named by VAR_FILE.
file_env() {
	local var="$1" def="${2:-}"
	local fvar="${var}_FILE"
	if [ -n "${!var:-}" ] && [ -n "${!fvar:-}" ]; then
		echo >&2 "error: both $var and $fvar are set (but are exclusive)"
		exit 1
	fi
	local val="$def"
	if [ -n "${!var:-}" ]; then
		val="${!var}"
	elif [ -n "${!fvar:-}" ]; then
		val="$(<"${!fvar}")"
	fi
	export "$var"="$val"
	unset "$fvar"
}

# `docker run image -c foo=bar` means `postgres -c foo=bar`.
if [ "${1:0:1}" = '-' ]; then
	set -- postgres "$@"
fi

if [ "$1" != 'postgres' ]; then
	exec "$@"
fi

if [ "$(id -u)" = '0' ]; then
	mkdir -p "$PGDATA"
	chmod 00700 "$PGDATA"
	find "$PGDATA" \! -user postgres -exec chown postgres:postgres '{}' +
	mkdir -p /var/run/postgresql
	chown postgres:postgres /var/run/postgresql
	chmod 3777 /var/run/postgresql
	HOME=/var/lib/postgresql exec setpriv --reuid=postgres --regid=postgres --init-groups \
		"$BASH_SOURCE" "$@"
fi

if [ ! -s "$PGDATA/PG_VERSION" ]; then
	file_env POSTGRES_PASSWORD
	file_env POSTGRES_USER postgres
	file_env POSTGRES_DB "$POSTGRES_USER"
	file_env POSTGRES_INITDB_ARGS
	if [ -z "$POSTGRES_PASSWORD" ]; then
		echo >&2 'error: database is uninitialized and POSTGRES_PASSWORD (or _FILE) is not set'
		exit 1
	fi

	echo >&2 "initializing $PGDATA for superuser $POSTGRES_USER"
	# Socket connections are trusted (as in the official image); TCP ones need the password.
	# shellcheck disable=SC2086
	initdb --username="$POSTGRES_USER" --pwfile=<(printf '%s\n' "$POSTGRES_PASSWORD") \
		--auth-local=trust --auth-host=scram-sha-256 $POSTGRES_INITDB_ARGS
	{
		echo
		echo 'host all all 0.0.0.0/0 scram-sha-256'
		echo 'host all all ::/0 scram-sha-256'
	} >>"$PGDATA/pg_hba.conf"

	# A socket-only server, so nothing counts as ready over TCP before initialization ends.
	pg_ctl -D "$PGDATA" -o "-c listen_addresses=''" -w start
	psql=(psql -v ON_ERROR_STOP=1 --no-password --no-psqlrc --username "$POSTGRES_USER")
	if [ "$POSTGRES_DB" != 'postgres' ]; then
		"${psql[@]}" --dbname postgres --set db="$POSTGRES_DB" <<-'EOSQL'
			CREATE DATABASE :"db";
		EOSQL
	fi
	for f in /docker-entrypoint-initdb.d/*; do
		case "$f" in
			*.sh) echo >&2 "running $f"; . "$f" ;;
			*.sql) echo >&2 "running $f"; "${psql[@]}" --dbname "$POSTGRES_DB" -f "$f" ;;
			*) ;;
		esac
	done
	pg_ctl -D "$PGDATA" -m fast -w stop
	unset POSTGRES_PASSWORD
	echo >&2 'initialization complete; starting the server'
fi

exec "$@"
