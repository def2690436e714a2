//! TLS, on a cluster of its own (127.0.0.1:55481, /tmp/pg_baton-tls) with
//! `ssl = on` and a server certificate signed by a test CA (made here with
//! openssl; it names `localhost` and 127.0.0.1):
//!  - `verify-full` with the CA connects over TLS, and a worker's every
//!    connection (pool and LISTEN) is encrypted while it runs a workflow;
//!  - `verify-full` with another CA is refused, so is a host name the
//!    certificate does not carry; `verify-ca` takes that name (the chain is
//!    what it checks);
//!  - `require` without a root certificate encrypts without verifying;
//!    `disable` does not encrypt.

mod common;

use baton::{Client, EnqueueOptions, Step, Worker, WorkflowDef};
use common::cluster::Cluster;
use serde_json::json;
use std::process::Command;
use std::time::Duration;

const CERTS: &str = "/tmp/pg_baton-tls-certs";

fn openssl(args: &str) {
    let out = Command::new("bash")
        .arg("-c")
        .arg(format!("cd {CERTS} && openssl {args}"))
        .output()
        .expect("openssl");
    assert!(
        out.status.success(),
        "openssl {args}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A CA, another CA, and a server certificate of the first for localhost
/// and 127.0.0.1, readable by the postgres user.
fn make_certs() {
    let _ = std::fs::remove_dir_all(CERTS);
    std::fs::create_dir_all(CERTS).unwrap();
    for ca in ["ca", "other-ca"] {
        openssl(&format!(
            "req -x509 -newkey rsa:2048 -nodes -days 2 -subj /CN=pg_baton-test-{ca} -keyout {ca}.key -out {ca}.pem 2>/dev/null"
        ));
    }
    std::fs::write(
        format!("{CERTS}/san.ext"),
        "subjectAltName=DNS:localhost,IP:127.0.0.1\n",
    )
    .unwrap();
    openssl("req -newkey rsa:2048 -nodes -subj /CN=localhost -keyout server.key -out server.csr 2>/dev/null");
    openssl("x509 -req -in server.csr -CA ca.pem -CAkey ca.key -CAcreateserial -days 2 -extfile san.ext -out server.crt 2>/dev/null");
    let out = Command::new("bash")
        .arg("-c")
        .arg(format!("chown -R postgres:postgres {CERTS} && chmod 600 {CERTS}/server.key && chmod 755 {CERTS}"))
        .output()
        .unwrap();
    assert!(out.status.success());
}

async fn encrypted(client: &Client) -> bool {
    let conn = client.pool().get().await.unwrap();
    conn.query_one(
        "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
        &[],
    )
    .await
    .unwrap()
    .get(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_modes_are_honoured() {
    make_certs();
    let cluster = Cluster::start(
        "tls",
        55481,
        "baton_tls",
        &format!(
            "ssl = on\nssl_cert_file = '{CERTS}/server.crt'\nssl_key_file = '{CERTS}/server.key'"
        ),
    );
    let base = |host: &str, extra: &str| {
        format!(
            "postgres://postgres@{host}:{}/{}?{extra}",
            cluster.port, cluster.db
        )
    };

    // verify-full with the CA: encrypted, and so is everything a worker opens.
    let url = base(
        "127.0.0.1",
        &format!("sslmode=verify-full&sslrootcert={CERTS}/ca.pem&application_name=tls_worker"),
    );
    let c = Client::connect(&url)
        .await
        .expect("verify-full with the right CA");
    assert!(encrypted(&c).await);
    c.define_workflow(
        &WorkflowDef::new("tls_flow")
            .queue("tls_q")
            .step(Step::new("s")),
    )
    .await
    .unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let worker = Worker::builder(&c)
        .queues(["tls_q"])
        .handler("tls_flow", "s", |_ctx| async { Ok(json!({"over": "tls"})) })
        .build();
    let handle = tokio::spawn(worker.run_until(async {
        let _ = stopped.await;
    }));
    let run = c
        .enqueue("tls_flow", &json!({}), EnqueueOptions::default())
        .await
        .unwrap();
    let out: serde_json::Value = c.wait_for(run, Duration::from_secs(30)).await.unwrap();
    assert_eq!(out, json!({"s": {"over": "tls"}}));
    let conn = c.pool().get().await.unwrap();
    let row = conn
        .query_one(
            "SELECT count(*), count(*) FILTER (WHERE s.ssl),
                    count(*) FILTER (WHERE a.pid IN (SELECT pid FROM baton.worker_sessions))
               FROM pg_stat_activity a JOIN pg_stat_ssl s USING (pid)
              WHERE a.application_name = 'tls_worker'",
            &[],
        )
        .await
        .unwrap();
    let (all, tls, registered): (i64, i64, i64) = (row.get(0), row.get(1), row.get(2));
    assert!(
        all >= 2 && registered == 1,
        "the pool and the registered LISTEN session: {all}, {registered}"
    );
    assert_eq!(tls, all, "every connection of the worker is encrypted");
    drop(conn);
    stop.send(()).unwrap();
    handle.await.unwrap().unwrap();

    // Another CA: refused. A name the certificate does not carry: refused by
    // verify-full, taken by verify-ca (hostaddr reaches the server).
    let wrong_ca = base(
        "127.0.0.1",
        &format!("sslmode=verify-full&sslrootcert={CERTS}/other-ca.pem"),
    );
    let e = Client::connect(&wrong_ca)
        .await
        .err()
        .expect("another CA is refused");
    assert!(
        format!("{e:?}").to_lowercase().contains("certificate"),
        "{e:?}"
    );
    let wrong_name = |mode: &str| {
        format!(
            "postgres://postgres@db.invalid:{}/{}?hostaddr=127.0.0.1&sslmode={mode}&sslrootcert={CERTS}/ca.pem",
            cluster.port, cluster.db
        )
    };
    let e = Client::connect(&wrong_name("verify-full"))
        .await
        .err()
        .expect("a wrong name is refused");
    assert!(
        format!("{e:?}").to_lowercase().contains("certificate"),
        "{e:?}"
    );
    let c = Client::connect(&wrong_name("verify-ca"))
        .await
        .expect("verify-ca checks the chain only");
    assert!(encrypted(&c).await);

    // require without a root certificate: encrypted, not verified; disable.
    let c = Client::connect(&base("localhost", "sslmode=require"))
        .await
        .expect("require");
    assert!(encrypted(&c).await);
    let c = Client::connect(&base("127.0.0.1", "sslmode=disable"))
        .await
        .expect("disable");
    assert!(!encrypted(&c).await);
}
