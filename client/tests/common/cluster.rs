//! Private PostgreSQL clusters for the tests that crash or fail over a
//! server: made by `scripts/lib.sh` (`start_cluster`: pg_baton preloaded,
//! its background worker serving the database), each on its own port and in
//! `/tmp/pg_baton-NAME`, stopped when dropped.

use std::process::Command;

pub struct Cluster {
    pub name: String,
    pub port: u16,
    pub db: String,
}

/// Run `script` in bash with `scripts/lib.sh` sourced; panics on failure.
pub fn lib_sh(script: &str, env: &[(&str, &str)]) {
    let lib = concat!(env!("CARGO_MANIFEST_DIR"), "/../scripts/lib.sh");
    let out = Command::new("bash")
        .arg("-c")
        .arg(format!("set -euo pipefail; source {lib}; {script}"))
        .envs(env.iter().copied())
        .output()
        .expect("bash");
    assert!(
        out.status.success(),
        "`{script}` failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

impl Cluster {
    /// A new cluster with pg_baton created in `db`; `conf` is added to its
    /// postgresql.conf.
    pub fn start(name: &str, port: u16, db: &str, conf: &str) -> Cluster {
        lib_sh(
            &format!(
                "start_cluster {name} {port} {db} 2>/dev/null
                 psql -X -q -h 127.0.0.1 -p {port} -U postgres {db} -c 'CREATE EXTENSION pg_baton'"
            ),
            &[("BATON_INTERVAL", "200ms"), ("BATON_EXTRA_CONF", conf)],
        );
        Cluster {
            name: name.into(),
            port,
            db: db.into(),
        }
    }

    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{}", self.port, self.db)
    }

    pub fn data(&self) -> String {
        format!("/tmp/pg_baton-{}/data", self.name)
    }

    /// `pg_ctl` with `args` on this cluster's data directory.
    pub fn pg_ctl(&self, args: &str) {
        let (data, name) = (self.data(), &self.name);
        lib_sh(
            &format!("as_postgres $PG_BIN/pg_ctl -D {data} -l /tmp/pg_baton-{name}/server.log -w {args} >/dev/null"),
            &[],
        );
    }

    /// Every server process killed at once, nothing more written
    /// (`pg_ctl -m immediate`).
    pub fn crash(&self) {
        self.pg_ctl("-m immediate stop");
    }

    pub fn start_again(&self) {
        self.pg_ctl("start");
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let name = self.name.clone();
        let _ = std::panic::catch_unwind(|| lib_sh(&format!("stop_cluster {name}"), &[]));
    }
}

impl Cluster {
    /// A streaming standby of `self` (pg_basebackup -R), started, on `port`;
    /// `conf` is added to its postgresql.conf.
    pub fn standby(&self, name: &str, port: u16, conf: &str) -> Cluster {
        let dir = format!("/tmp/pg_baton-{name}");
        let primary = self.port;
        lib_sh(
            &format!(
                "stop_cluster {name}; rm -rf {dir}; install -d -o postgres -g postgres {dir}
                 as_postgres $PG_BIN/pg_basebackup -h 127.0.0.1 -p {primary} -U postgres -D {dir}/data -R -X stream -c fast
                 printf \"port = {port}\\nunix_socket_directories = '{dir}'\\n{conf}\\n\" | as_postgres tee -a {dir}/data/postgresql.conf >/dev/null
                 as_postgres $PG_BIN/pg_ctl -D {dir}/data -l {dir}/server.log -w start >/dev/null"
            ),
            &[],
        );
        Cluster {
            name: name.into(),
            port,
            db: self.db.clone(),
        }
    }

    /// Refuse replication connections from now on (pg_hba.conf, reloaded):
    /// a standby that loses its connection cannot come back.
    pub fn refuse_replication(&self) {
        let (data, port) = (self.data(), self.port);
        lib_sh(
            &format!(
                "as_postgres sed -i '1i host replication all 127.0.0.1/32 reject' {data}/pg_hba.conf
                 psql -X -q -h 127.0.0.1 -p {port} -U postgres -c 'SELECT pg_reload_conf()' postgres >/dev/null"
            ),
            &[],
        );
    }

    /// Promote this standby to a primary and wait until it is one.
    pub fn promote(&self) {
        self.pg_ctl("promote");
    }
}
