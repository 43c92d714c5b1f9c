//! TLS to the server (`mysql.tls`), against a private MariaDB with a
//! certificate made here (a test CA and a server certificate for
//! localhost) and `require_secure_transport = ON`.

use std::path::{Path, PathBuf};
use std::time::Duration;

use mysql_async::prelude::*;
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
use tailcache::check::run_checks;
use tailcache::config::Config;

use crate::harness::{self, Daemon, Memcached, PrivateServer, TestDb};

/// A CA, a server certificate it signed, and an unrelated second CA.
struct Certs {
    dir: tempfile::TempDir,
}

impl Certs {
    fn make() -> Certs {
        let dir = tempfile::tempdir().expect("cert dir");
        let ca = |cn: &str| {
            let key = KeyPair::generate().expect("CA key");
            let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
            params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
            params.distinguished_name.push(DnType::CommonName, cn);
            let cert = params.self_signed(&key).expect("self-sign CA");
            (cert, Issuer::new(params, key))
        };
        let (ca_cert, issuer) = ca("tailcache test CA");
        let (other_ca, _) = ca("some other CA");
        let key = KeyPair::generate().expect("server key");
        // Named for localhost only: connections to 127.0.0.1 tell verify_ca
        // (chain only) from verify_identity (chain and name).
        let mut params = CertificateParams::new(vec!["localhost".to_owned()]).expect("server params");
        params.distinguished_name.push(DnType::CommonName, "tailcache test server");
        let server = params.signed_by(&key, &issuer).expect("sign server cert");
        let write = |name: &str, text: String| std::fs::write(dir.path().join(name), text).expect("write pem");
        write("ca.pem", ca_cert.pem());
        write("other-ca.pem", other_ca.pem());
        write("server.pem", server.pem());
        write("server-key.pem", key.serialize_pem());
        Certs { dir }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn server_args(&self) -> Vec<String> {
        vec![
            format!("--ssl-cert={}", self.path("server.pem").display()),
            format!("--ssl-key={}", self.path("server-key.pem").display()),
            format!("--ssl-ca={}", self.path("ca.pem").display()),
            "--require-secure-transport=ON".to_owned(),
        ]
    }
}

async fn tls_server() -> (Certs, PrivateServer) {
    let certs = Certs::make();
    let args = certs.server_args();
    let server = tokio::task::spawn_blocking(move || {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        harness::start_private_mariadb(&args)
    })
    .await
    .expect("start private MariaDB with TLS");
    (certs, server)
}

fn config(url: &str, server_id: u32, tls: &str, extra: &str) -> Config {
    let text = format!(
        "[mysql]\nurl = {url:?}\nserver_id = {server_id}\ntables = [\"t\"]\nconnect_timeout_secs = 20\ntls = {tls:?}\n{extra}\n[state]\npath = \":memory:\"\n"
    );
    Config::from_toml(&text).expect("test config parses")
}

fn ca_line(path: &Path) -> String {
    format!("tls_ca_file = {:?}", path.display().to_string())
}

async fn root_exec(db: &TestDb, stmts: &[String]) {
    let mut root = db.root_conn().await;
    for s in stmts {
        root.query_drop(s).await.unwrap_or_else(|e| panic!("{s}: {e}"));
    }
    root.disconnect().await.expect("disconnect root");
}

/// The rendered line for check `name`.
fn line<'a>(text: &'a str, name: &str) -> &'a str {
    text.lines()
        .find(|l| l.get(5..).is_some_and(|rest| rest.starts_with(&format!("{name}: "))))
        .unwrap_or_else(|| panic!("no line for {name:?} in report:\n{text}"))
}

#[tokio::test(flavor = "multi_thread")]
async fn tls_modes_against_a_server_that_requires_tls() {
    let (certs, server) = tls_server().await;
    let db = server.create_db("tls modes").await;
    root_exec(&db, &["CREATE TABLE t (id INT PRIMARY KEY, v INT)".into()]).await;

    // required: encrypted, and `check` says so.
    let report = run_checks(&config(&db.url, db.server_id, "required", "")).await;
    let text = report.render();
    assert!(report.ok(), "{text}");
    let l = line(&text, "tls");
    assert!(l.starts_with("ok   tls: encrypted (TLSv1."), "{l}");
    assert!(l.contains("certificate not verified"), "{l}");

    // preferred (the default) encrypts too when the server offers TLS.
    let report = run_checks(&config(&db.url, db.server_id, "preferred", "")).await;
    assert!(line(&report.render(), "tls").starts_with("ok   tls: encrypted"), "{}", report.render());

    // disabled: refused by require_secure_transport, said so, naming mysql.tls.
    let e = tailcache::source::conn::connect(&config(&db.url, db.server_id, "disabled", "").mysql).await.unwrap_err();
    let msg = e.to_string();
    assert_eq!(e.recovery(), tailcache::Recovery::Fatal, "{msg}");
    assert!(msg.contains("requires TLS") && msg.contains("mysql.tls"), "{msg}");
    assert!(!msg.contains("check the password"), "{msg}");
    let report = run_checks(&config(&db.url, db.server_id, "disabled", "")).await;
    let l = line(&report.render(), "connect").to_owned();
    assert!(
        l.starts_with("FAIL connect: ")
            && l.contains("mysql.tls")
            && !l.contains("check the password")
            && !l.contains("check the user name"),
        "{l}"
    );

    // verify_ca with the CA that signed the server's certificate.
    let right = ca_line(&certs.path("ca.pem"));
    let report = run_checks(&config(&db.url, db.server_id, "verify_ca", &right)).await;
    let text = report.render();
    assert!(report.ok(), "{text}");
    assert!(line(&text, "tls").contains("certificate verified against mysql.tls_ca_file"), "{text}");
    // ...though the certificate names localhost, not 127.0.0.1: verify_ca
    // does not check the name, verify_identity does.
    let e = tailcache::source::conn::connect(&config(&db.url, db.server_id, "verify_identity", &right).mysql)
        .await
        .unwrap_err();
    let msg = e.to_string();
    assert!(msg.contains("mysql.tls = \"verify_identity\"") && msg.contains("not valid for name"), "{msg}");
    let by_name = db.url.replace("127.0.0.1", "localhost");
    let mut conn = tailcache::source::conn::connect(&config(&by_name, db.server_id, "verify_identity", &right).mysql)
        .await
        .expect("verify_identity through the name in the certificate");
    assert!(tailcache::source::conn::tls_status(&mut conn).await.unwrap().is_some());
    conn.disconnect().await.unwrap();

    // verify_ca with a CA that did not sign it: a clear refusal.
    let wrong = ca_line(&certs.path("other-ca.pem"));
    let e =
        tailcache::source::conn::connect(&config(&db.url, db.server_id, "verify_ca", &wrong).mysql).await.unwrap_err();
    let msg = e.to_string();
    assert_eq!(e.recovery(), tailcache::Recovery::Fatal, "{msg}");
    assert!(msg.contains("mysql.tls = \"verify_ca\"") && msg.contains("TLS handshake"), "{msg}");
    assert!(msg.contains("mysql.tls_ca_file") && msg.contains("other-ca.pem"), "{msg}");

    // Config validation names the setting.
    let p = config(&db.url, db.server_id, "verify_ca", "").validate();
    assert!(p.iter().any(|p| p.key == "mysql.tls_ca_file"), "{p:?}");
    let p = config(&db.url, db.server_id, "verify_ca", &ca_line(&certs.path("nosuch.pem"))).validate();
    assert!(p.iter().any(|p| p.key == "mysql.tls_ca_file" && p.found.contains("nosuch.pem")), "{p:?}");
    let p =
        config(&db.url, db.server_id, "required", &format!("tls_cert_file = {:?}", certs.path("ca.pem"))).validate();
    assert!(p.iter().any(|p| p.key == "mysql.tls_key_file"), "{p:?}");
    assert!(
        Config::from_toml(&format!(
            "[mysql]\nurl = {:?}\nserver_id = 1\ntables = [\"t\"]\ntls = \"on\"\n[state]\npath = \":memory:\"\n",
            db.url
        ))
        .unwrap_err()
        .contains("tls")
    );

    // An account created REQUIRE SSL, with tls disabled, on a server that
    // no longer requires TLS for everyone.
    let mut root = db.root_conn().await;
    root.query_drop("SET GLOBAL require_secure_transport = OFF").await.unwrap();
    let secure_user = format!("{}_ssl", db.user);
    root.query_drop(format!("CREATE USER '{secure_user}'@'%' IDENTIFIED BY '{}' REQUIRE SSL", db.password))
        .await
        .unwrap();
    root.query_drop(format!("GRANT SELECT ON `{}`.* TO '{secure_user}'@'%'", db.name)).await.unwrap();
    root.disconnect().await.unwrap();
    let url = db.url.replacen(&format!("//{}:", db.user), &format!("//{secure_user}:"), 1);
    let e = tailcache::source::conn::connect(&config(&url, db.server_id, "disabled", "").mysql).await.unwrap_err();
    let msg = e.to_string();
    assert!(msg.contains("requires TLS") && msg.contains("mysql.tls = \"required\""), "{msg}");
    assert!(!msg.contains("check the password"), "{msg}");
    let conn = tailcache::source::conn::connect(&config(&url, db.server_id, "required", "").mysql)
        .await
        .expect("the REQUIRE SSL account over TLS");
    conn.disconnect().await.unwrap();
    let mut root = db.root_conn().await;
    root.query_drop("SET GLOBAL require_secure_transport = ON").await.unwrap();
    root.disconnect().await.unwrap();
    drop(server);
}

#[tokio::test(flavor = "multi_thread")]
async fn daemon_replicates_to_memcached_over_tls() {
    let (certs, server) = tls_server().await;
    let db = server.create_db("tls daemon").await;
    root_exec(&db, &["CREATE TABLE t (id INT PRIMARY KEY, v INT)".into(), "INSERT INTO t VALUES (1, 10)".into()]).await;
    let mc = Memcached::start();
    let dir = tempfile::tempdir().unwrap();
    let cfg = format!(
        "[mysql]\nurl = {:?}\nserver_id = {}\ntables = [\"t\"]\nheartbeat_secs = 0.5\ntls = \"verify_identity\"\n{}\n\n\
         [state]\npath = {:?}\n\n[memcached]\nservers = [\"{}\"]\nkey_prefix = \"tls:\"\ncodec = \"json\"\n\n\
         [[views]]\nname = \"t\"\nkey = \"t:{{id}}\"\nquery = \"SELECT id, v FROM t\"\n",
        // The certificate names localhost.
        db.url.replace("127.0.0.1", "localhost"),
        db.server_id,
        ca_line(&certs.path("ca.pem")),
        dir.path().join("s.db").display().to_string(),
        mc.addr()
    );
    let daemon = Daemon::start(&cfg);
    let value = |mc: &Memcached, key: &str| {
        mc.get_raw(key).map(|(b, _)| serde_json::from_slice::<serde_json::Value>(&b).expect("JSON value"))
    };
    harness::wait_until("the snapshot's row in memcached", Duration::from_secs(60), || {
        let v = value(&mc, "tls:t:1");
        async move { v.filter(|v| v["v"] == 10).map(|_| ()) }
    })
    .await;
    root_exec(&db, &["INSERT INTO t VALUES (2, 20)".into()]).await;
    harness::wait_until("a row committed after start, streamed over TLS", Duration::from_secs(30), || {
        let v = value(&mc, "tls:t:2");
        async move { v.filter(|v| v["v"] == 20).map(|_| ()) }
    })
    .await;
    // require_secure_transport = ON refuses every plain connection, so the
    // snapshot, the binlog stream and the preflight all ran over TLS.
    assert!(daemon.log().contains("snapshot taken"), "{}", daemon.log());
    drop(daemon);
}

/// `preferred` (the default) against a server that offers no TLS: one
/// plain connection, decided in its own handshake, not a refused TLS
/// attempt followed by a second connection.
#[tokio::test(flavor = "multi_thread")]
async fn preferred_without_tls_on_the_server_is_one_plain_connection() {
    let server = tokio::task::spawn_blocking(|| harness::start_private_mariadb(&[]))
        .await
        .expect("start private MariaDB without TLS");
    let db = server.create_db("tls preferred plain").await;
    let mut root = db.root_conn().await;
    let connections = |rows: Vec<(String, u64)>| rows[0].1;
    let before = connections(root.query("SHOW GLOBAL STATUS LIKE 'Connections'").await.unwrap());
    let cfg = config(&db.url, db.server_id, "preferred", "");
    let mut conn = tailcache::source::conn::connect(&cfg.mysql).await.expect("preferred connects without TLS");
    assert_eq!(tailcache::source::conn::tls_status(&mut conn).await.unwrap(), None, "the session is plain");
    let after = connections(root.query("SHOW GLOBAL STATUS LIKE 'Connections'").await.unwrap());
    assert_eq!(after - before, 1, "connection attempts the server counted for one connect");
    conn.disconnect().await.unwrap();
    root.disconnect().await.unwrap();
}
