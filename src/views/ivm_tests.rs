//! Property test of incremental view maintenance: random transactions,
//! applied through the real applier (which captures the row images), are
//! published incrementally wherever the view allows; after every
//! transaction, what a memcached fed only those plans would hold must be
//! byte for byte what a full recompute produces.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, SystemTime};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rusqlite::Connection;
use rusqlite::types::{Value, ValueRef};

use super::published::Published;
use super::tests::swept;
use super::*;
use crate::config::{Codec, MemcachedConfig, Shape, TableRef, ViewConfig};
use crate::position::{BinlogPosition, Checkpoint};
use crate::replica::action::{Action, RowChange};
use crate::replica::applier::Applier;
use crate::schema::{ColumnDef, TableSchema};
use crate::sink::Op;

fn col(name: &str, data_type: &str) -> ColumnDef {
    ColumnDef::for_tests(name, data_type)
}

fn table(name: &str, cols: &[(&str, &str)], pk: &[usize]) -> TableSchema {
    TableSchema {
        table: TableRef { schema: "appdb".into(), name: name.into(), qualified: false },
        columns: cols.iter().map(|(n, t)| col(n, t)).collect(),
        primary_key: pk.to_vec(),
    }
}

fn schemas() -> Vec<TableSchema> {
    vec![
        table("app", &[("id", "int"), ("name", "varchar"), ("status", "varchar"), ("grp", "int")], &[0]),
        table("feature", &[("id", "int"), ("app_id", "int"), ("code", "varchar"), ("enabled", "int")], &[0]),
        table("blocked", &[("app_id", "int"), ("reason", "varchar")], &[0]),
        table("tag", &[("tenant", "int"), ("id", "int"), ("app_id", "int"), ("label", "varchar")], &[0, 1]),
    ]
}

fn view(name: &str, key: &str, query: &str, json: &[&str]) -> ViewConfig {
    ViewConfig {
        name: name.into(),
        key: key.into(),
        query: query.into(),
        shape: Shape::Row,
        map_key: None,
        value_column: None,
        json_columns: json.iter().map(|s| s.to_string()).collect(),
        on_error: Default::default(),
    }
}

/// (view, expected to be incremental)
fn views() -> Vec<(ViewConfig, bool)> {
    let mut list =
        ViewConfig { shape: Shape::List, ..view("list", "all", "SELECT id, name FROM app ORDER BY id", &[]) };
    list.key = "list".into();
    let map = ViewConfig {
        shape: Shape::Map,
        map_key: Some("id".into()),
        ..view("map", "bymap", "SELECT id, status FROM app ORDER BY name, id", &[])
    };
    vec![
        (view("single", "app:{id}", "SELECT id, name, status, grp FROM app", &[]), true),
        (view("filtered", "on:{id}", "SELECT id, name FROM app WHERE status = 'on'", &[]), true),
        (
            view(
                "nested",
                "full:{id}",
                "SELECT a.id, a.name, (SELECT json_group_array(f.code) FROM feature f WHERE f.app_id = a.id AND f.enabled = 1) AS codes FROM app a WHERE a.status <> 'off'",
                &["codes"],
            ),
            true,
        ),
        (
            view(
                "join",
                "feat:{id}",
                "SELECT f.id, f.code, a.name AS app FROM feature f JOIN app a ON a.id = f.app_id WHERE a.status = 'on'",
                &[],
            ),
            true,
        ),
        (
            view(
                "agg",
                "cnt:{app_id}",
                "SELECT f.app_id, count(*) AS n, sum(f.enabled) AS en, json_group_array(f.code) AS codes FROM feature f GROUP BY f.app_id HAVING count(*) > 0",
                &[],
            ),
            true,
        ),
        (
            view(
                "notblocked",
                "ok:{id}",
                "SELECT a.id, a.name FROM app a WHERE NOT EXISTS (SELECT 1 FROM blocked b WHERE b.app_id = a.id)",
                &[],
            ),
            true,
        ),
        (
            view(
                "leftagg",
                "lj:{id}",
                "SELECT a.id, count(f.id) AS n FROM app a LEFT JOIN feature f ON f.app_id = a.id AND f.enabled = 1 GROUP BY a.id",
                &[],
            ),
            true,
        ),
        (
            view(
                "composite",
                "tag:{tenant}:{id}",
                "SELECT t.tenant, t.id, t.label, a.name FROM tag t LEFT JOIN app a ON a.id = t.app_id",
                &[],
            ),
            true,
        ),
        (view("groups", "grp:{grp}", "SELECT grp, count(*) AS n, min(name) AS first FROM app GROUP BY grp", &[]), true),
        (view("twice", "tw:{id}", "SELECT a.id, (SELECT count(*) FROM app) AS total FROM app a", &[]), false),
        (view("unlinked", "in:{id}", "SELECT a.id FROM app a WHERE a.id IN (SELECT app_id FROM feature)", &[]), true),
        (view("dupes", "d:{app_id}", "SELECT f.app_id, f.code FROM feature f", &[]), true),
        (list, true),
        // ORDER BY a column the result does not have: not patchable.
        (map, false),
        (
            ViewConfig {
                shape: Shape::Map,
                map_key: Some("id".into()),
                ..view(
                    "mapnested",
                    "mapnested",
                    "SELECT a.id, a.name, (SELECT json_group_array(f.code) FROM feature f WHERE f.app_id = a.id AND f.enabled = 1) AS codes FROM app a WHERE a.status <> 'off' ORDER BY name DESC, id",
                    &["codes"],
                )
            },
            true,
        ),
        (
            ViewConfig {
                shape: Shape::List,
                ..view(
                    "listjoin",
                    "listjoin",
                    "SELECT f.id AS fid, f.code, a.name AS appname, a.grp FROM feature f JOIN app a ON a.id = f.app_id WHERE a.status = 'on' ORDER BY grp, appname DESC, code, fid",
                    &[],
                )
            },
            true,
        ),
        (
            ViewConfig {
                shape: Shape::Map,
                map_key: Some("id".into()),
                value_column: Some("name".into()),
                ..view("mapval", "mapval", "SELECT id, name, grp FROM app WHERE status = 'on' ORDER BY grp, id", &[])
            },
            true,
        ),
        (
            ViewConfig {
                shape: Shape::List,
                ..view(
                    "listagg",
                    "listagg",
                    "SELECT f.app_id, count(*) AS n, json_group_array(f.code) AS codes FROM feature f GROUP BY f.app_id ORDER BY n DESC, app_id",
                    &["codes"],
                )
            },
            true,
        ),
        // A tie between rows (grp alone does not order them): patching is
        // refused at run time, every change recomputes in full.
        (
            ViewConfig {
                shape: Shape::List,
                ..view("listties", "listties", "SELECT grp, name FROM app ORDER BY grp", &[])
            },
            true,
        ),
        (
            view(
                "aggwhere",
                "aw:{app_id}",
                "SELECT f.app_id, count(*) AS n, group_concat(f.code) AS codes FROM feature f WHERE f.enabled = 1 OR f.code = 'y' GROUP BY f.app_id HAVING n > 0 ORDER BY n",
                &[],
            ),
            true,
        ),
        // Keys that do not always render: a NULL group, a name with a
        // space. Their rows are rejected on both paths alike.
        (view("nullkey", "nk:{grp}:{id}", "SELECT id, grp, name FROM app WHERE status <> 'off'", &[]), true),
        (view("namekey", "nm:{name}:{id}", "SELECT id, name FROM app", &[]), true),
    ]
}

fn mc(codec: Codec) -> MemcachedConfig {
    MemcachedConfig {
        servers: vec!["127.0.0.1:11211".into()],
        key_prefix: "p:".into(),
        codec,
        exptime: 0,
        max_item_size: 1024 * 1024,
        coalesce_ms: 2,
        timeout_ms: 1000,
        distribution: Default::default(),
        weights: Vec::new(),
    }
}

fn current(conn: &Connection, t: &TableSchema, pk: &[Value]) -> Option<Vec<Value>> {
    let cond: Vec<String> =
        t.primary_key.iter().enumerate().map(|(n, &i)| format!("\"{}\" = ?{}", t.columns[i].name, n + 1)).collect();
    let sql = format!("SELECT * FROM \"{}\" WHERE {}", t.table.name, cond.join(" AND "));
    let mut st = conn.prepare_cached(&sql).unwrap();
    let mut rows = st.query(rusqlite::params_from_iter(pk.iter())).unwrap();
    rows.next().unwrap().map(|r| (0..t.columns.len()).map(|i| r.get::<_, Value>(i).unwrap()).collect())
}

fn random_row(rng: &mut StdRng, t: usize) -> Vec<Value> {
    let small = |rng: &mut StdRng, n: i64| Value::Integer(rng.random_range(1..=n));
    let word = |rng: &mut StdRng, w: &[&str]| Value::Text(w[rng.random_range(0..w.len())].to_owned());
    match t {
        0 => vec![
            small(rng, 12),
            word(rng, &["ann", "bob", "cy", "dee", "e f"]),
            word(rng, &["on", "off", "new"]),
            if rng.random_bool(0.1) { Value::Null } else { small(rng, 3) },
        ],
        1 => vec![small(rng, 30), small(rng, 13), word(rng, &["x", "y", "z", "w"]), small(rng, 2)],
        2 => vec![small(rng, 13), word(rng, &["spam", "late"])],
        _ => vec![small(rng, 2), small(rng, 6), small(rng, 13), word(rng, &["red", "blue"])],
    }
}

fn refs(row: &[Value]) -> Vec<ValueRef<'_>> {
    row.iter().map(ValueRef::from).collect()
}

/// One random change to table `t`; returns whether something was applied.
fn random_change(rng: &mut StdRng, conn: &Connection, applier: &mut Applier<'_>, s: &[TableSchema], t: usize) -> bool {
    let schema = &s[t];
    let mut row = random_row(rng, t);
    let pk: Vec<Value> = schema.primary_key.iter().map(|&i| row[i].clone()).collect();
    let existing = current(conn, schema, &pk);
    let change = rng.random_range(0..3);
    match (existing, change) {
        (None, _) => {
            applier.apply(Action::Row { table: t, change: RowChange::Insert(&refs(&row)) }).unwrap();
        }
        (Some(before), 0) => {
            applier.apply(Action::Row { table: t, change: RowChange::Delete(&refs(&before)) }).unwrap();
        }
        (Some(before), _) => {
            // Keep the key most of the time; sometimes move it.
            if rng.random_bool(0.7) {
                for &i in &schema.primary_key {
                    row[i] = before[i].clone();
                }
            } else {
                let new_pk: Vec<Value> = schema.primary_key.iter().map(|&i| row[i].clone()).collect();
                if current(conn, schema, &new_pk).is_some() {
                    return false; // would collide with another row
                }
            }
            let (b, a) = (refs(&before), refs(&row));
            applier.apply(Action::Row { table: t, change: RowChange::Update { before: &b, after: &a } }).unwrap();
        }
    }
    true
}

fn full_map(vs: &ViewSet, conn: &Connection, i: usize, now: SystemTime) -> HashMap<String, Vec<u8>> {
    let c = vs.compute(conn, i, now, &mut Scratch::default()).unwrap();
    c.entries.into_iter().map(|e| (e.key, e.value)).collect()
}

#[test]
fn incremental_publishing_equals_full_recompute_after_every_transaction() {
    let seed: u64 =
        std::env::var("TAILCACHE_TEST_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(|| rand::rng().random());
    eprintln!("incremental property test: TAILCACHE_TEST_SEED={seed}");
    // Every codec: the map/list entries are patched in their msgpack form
    // and then encoded, which must equal encoding the full recompute.
    for (n, (codec, transactions)) in
        [(Codec::Msgpack, 400), (Codec::Json, 100), (Codec::Pickle, 100), (Codec::Dogpile, 100)].into_iter().enumerate()
    {
        property_run(seed.wrapping_add(n as u64), codec, transactions);
    }
}

/// A state file (in the returned temp dir, `state.db`) holding the
/// schemas' empty replica tables.
fn replica_with_tables() -> (tempfile::TempDir, Vec<TableSchema>, Vec<TableRef>, Connection) {
    let dir = tempfile::tempdir().unwrap();
    let tables = schemas();
    let refs_: Vec<TableRef> = tables.iter().map(|t| t.table.clone()).collect();
    let conn = crate::replica::open_connection(&dir.path().join("state.db"), &refs_).unwrap();
    for t in &tables {
        crate::replica::tables::recreate_table(&conn, t).unwrap();
    }
    (dir, tables, refs_, conn)
}

fn property_run(seed: u64, codec: Codec, transactions: usize) {
    eprintln!("codec {codec:?}");
    let mut rng = StdRng::seed_from_u64(seed);
    let (dir, tables, refs_, conn) = replica_with_tables();
    let path = dir.path().join("state.db");
    let pconn = crate::replica::open_connection(&path, &refs_).unwrap();
    // The publisher's bookkeeping connection.
    let book = crate::replica::open_connection(&path, &refs_).unwrap();
    let mut applier = Applier::new(&conn, refs_.clone()).unwrap();
    for (i, t) in tables.iter().enumerate() {
        applier.set_schema(i, t).unwrap();
    }
    let configs = views();
    let cfgs: Vec<ViewConfig> = configs.iter().map(|(v, _)| v.clone()).collect();
    let vs = ViewSet::compile(&pconn, &cfgs, &mc(codec), &refs_).unwrap();
    for (v, (_, expect)) in vs.views().iter().zip(&configs) {
        eprintln!("{}: {}", v.name(), v.maintenance());
        assert_eq!(v.incremental().is_ok(), *expect, "{}: {}", v.name(), v.maintenance());
        if let Ok(plan) = v.incremental()
            && plan.order.is_empty()
        {
            let st = pconn.prepare(&plan.restricted_null_sql);
            assert!(st.is_ok(), "{}: {}: {st:?}", v.name(), plan.restricted_null_sql);
        }
    }
    assert!(vs.views()[10].maintenance().contains("feature recompute in full"), "{}", vs.views()[10].maintenance());
    assert!(vs.views()[3].maintenance().contains("app via"), "{}", vs.views()[3].maintenance());
    assert!(!vs.views()[0].incremental().unwrap().scans_key_table, "{}", vs.views()[0].maintenance());

    let mut published = Published::load(&book).unwrap();
    let mut cache: HashMap<String, Vec<u8>> = HashMap::new();
    let mut incremental_runs = vec![0usize; vs.views().len()];
    let mut partial_scopes = vec![0usize; vs.views().len()];
    let mut full_runs = vec![0usize; vs.views().len()];
    let mut rejections_seen = vec![0usize; vs.views().len()];
    let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
    let mut scratch = Scratch::default();
    let mut seq = 0u64;
    for txn in 0..transactions {
        // Sometimes two MySQL transactions land in one batch.
        let batches = if rng.random_bool(0.2) { 2 } else { 1 };
        let mut touched = HashSet::new();
        for _ in 0..batches {
            let ops = rng.random_range(1..=if txn < 40 { 8 } else { 4 });
            applier.begin().unwrap();
            for _ in 0..ops {
                let t = rng.random_range(0..tables.len());
                if random_change(&mut rng, &conn, &mut applier, &tables, t) {
                    touched.insert(tables[t].table.sqlite_name());
                }
            }
            seq += 1;
            let cp = Checkpoint { position: BinlogPosition::new("b.000001", seq), gtid: None };
            applier.apply(Action::Commit { checkpoint: &cp, consistent: true }).unwrap();
        }
        let changes = applier.take_changes();
        // Publish as the publisher does, on its own connection.
        pconn.execute_batch("BEGIN").unwrap();
        let first = txn == 0;
        let mut computed = Vec::new();
        // Views computed in full go piece by piece (three rows a piece,
        // so that keys repeat across pieces), as in the publisher.
        let mut plans = Vec::new();
        let mut done = HashSet::new();
        for i in vs.affected(&touched).into_iter().chain(if first { 0..vs.views().len() } else { 0..0 }) {
            if !done.insert(i) {
                continue;
            }
            let incremental = if !first && vs.can_increment(i, &touched, &changes) {
                vs.compute_incremental(&pconn, i, &touched, &changes, now, &mut scratch).unwrap()
            } else {
                None
            };
            let c = match incremental {
                Some(c) => {
                    incremental_runs[i] += 1;
                    // What it rejects, a full computation rejects too.
                    let full = vs.compute(&pconn, i, now, &mut Scratch::default()).unwrap();
                    let full: HashSet<String> = full.rejected.iter().map(|r| r.to_string()).collect();
                    for r in &c.rejected {
                        assert!(
                            full.contains(&r.to_string()),
                            "seed {seed}, transaction {txn}: the incremental path rejected what a full computation does not: {r}"
                        );
                        rejections_seen[i] += 1;
                    }
                    c
                }
                None if vs.views()[i].shape() == Shape::Row => {
                    full_runs[i] += 1;
                    plans.push(swept(&pconn, &book, &vs, i, 3));
                    continue;
                }
                None => vs.compute(&pconn, i, now, &mut scratch).unwrap(),
            };
            if c.scope.is_some() {
                partial_scopes[i] += 1;
            }
            if !c.incremental {
                full_runs[i] += 1;
            }
            computed.push(c);
        }
        plans.push(published.diff(&book, computed, &vs).unwrap());
        for plan in &plans {
            for op in &plan.ops {
                match op {
                    Op::Set { key, value, .. } => {
                        cache.insert(String::from_utf8(key.clone()).unwrap(), value.clone());
                    }
                    Op::Delete { key } => {
                        cache.remove(std::str::from_utf8(key.as_slice()).unwrap());
                    }
                }
            }
            published.record(&book, &plan.changes, None).unwrap();
        }
        pconn.execute_batch("COMMIT").unwrap();

        // The arbiter: every view, recomputed in full.
        let mut expected: HashMap<String, Vec<u8>> = HashMap::new();
        for i in 0..vs.views().len() {
            expected.extend(full_map(&vs, &pconn, i, now));
        }
        if cache != expected {
            let mut diff = Vec::new();
            for (k, v) in &expected {
                if cache.get(k) != Some(v) {
                    diff.push(format!("{k}: cache {:?} != full {:?}", cache.get(k).map(|b| b.len()), v.len()));
                }
            }
            for k in cache.keys().filter(|k| !expected.contains_key(*k)) {
                diff.push(format!("{k}: stale in cache"));
            }
            diff.sort();
            panic!(
                "seed {seed}, codec {codec:?}, transaction {txn}: incremental state differs from a full recompute:\n{}",
                diff.join("\n")
            );
        }
    }
    eprintln!("incremental runs per view: {incremental_runs:?}");
    eprintln!("rejections on the incremental path per view: {rejections_seen:?}");
    for name in ["nullkey", "namekey"] {
        let i = vs.views().iter().position(|v| v.name() == name).unwrap();
        assert!(rejections_seen[i] > 0, "view {name}: no rejection on the incremental path");
    }
    for (i, (_, expect)) in configs.iter().enumerate() {
        if *expect && !["dupes", "listties"].contains(&vs.views()[i].name()) {
            assert!(
                incremental_runs[i] > transactions / 10,
                "view {} ran incrementally {} times",
                vs.views()[i].name(),
                incremental_runs[i]
            );
        }
        if !*expect {
            assert_eq!(partial_scopes[i], 0);
            assert_eq!(incremental_runs[i], 0);
        }
    }
    // Rows that tie are never patched: once two rows share a grp, every
    // change recomputes the list in full (the equality above held).
    let ties = vs.views().iter().position(|v| v.name() == "listties").unwrap();
    assert!(
        full_runs[ties] > 10 * incremental_runs[ties].max(1),
        "listties: {} full, {} patched",
        full_runs[ties],
        incremental_runs[ties]
    );
}

/// The lookups of the incremental path search indexes (tailcache creates
/// them in the replica), so a one-row commit does not scan a table: K by a
/// key that is not its primary key, linked tables by their link column
/// (correlated subqueries, joins), K by its link column (the fill).
#[test]
fn incremental_lookups_search_indexes_instead_of_scanning() {
    let (_dir, _tables, refs_, conn) = replica_with_tables();
    let cfgs = vec![
        view(
            "by_name",
            "n:{name}",
            "SELECT a.name, (SELECT json_group_array(f.code) FROM feature f WHERE f.app_id = a.id) AS codes FROM app a WHERE a.status = 'on'",
            &["codes"],
        ),
        view(
            "join",
            "feat:{id}",
            "SELECT f.id, f.code, a.name AS app FROM feature f JOIN app a ON a.id = f.app_id",
            &[],
        ),
        view(
            "agg",
            "cnt:{app_id}",
            "SELECT f.app_id, count(*) AS n FROM feature f WHERE f.enabled = 1 OR f.code = 'x' GROUP BY f.app_id",
            &[],
        ),
    ];
    let vs = ViewSet::compile(&conn, &cfgs, &mc(Codec::Msgpack), &refs_).unwrap();
    let scans = |sql: &str| -> Vec<String> {
        let mut st = conn.prepare(&format!("EXPLAIN QUERY PLAN {sql}")).unwrap();
        let d: Vec<String> = st.query_map([], |r| r.get::<_, String>(3)).unwrap().map(Result::unwrap).collect();
        d.into_iter()
            .filter(|d| d.starts_with("SCAN ") && !d.starts_with("SCAN temp.") && d != "SCAN _tailcache_q")
            .collect()
    };
    for v in vs.views() {
        let plan = v.incremental().unwrap_or_else(|why| panic!("{}: {why}", v.name()));
        assert!(!plan.scans_key_table, "{}", v.maintenance());
        assert_eq!(scans(&plan.restricted_sql), Vec::<String>::new(), "{}: {}", v.name(), plan.restricted_sql);
        for l in &plan.links {
            conn.execute_batch(&l.create_sql).unwrap();
            assert_eq!(scans(&l.fill_sql), Vec::<String>::new(), "{}: {}", v.name(), l.fill_sql);
        }
    }
}

type Row = Vec<Value>;

fn app_row(id: i64, name: &str, status: &str, grp: Option<i64>) -> Row {
    vec![
        Value::Integer(id),
        Value::Text(name.into()),
        Value::Text(status.into()),
        grp.map_or(Value::Null, Value::Integer),
    ]
}

/// The incremental path rejects exactly the changed rows a full
/// computation rejects (a bad key, a NULL or BLOB key column, a value too
/// large), even when they are the batch's only rows, reports nothing for
/// a row the view filters out, and deletes the value published earlier
/// under a key whose new entry is rejected.
#[test]
fn incremental_path_rejects_what_a_full_computation_rejects() {
    let (dir, tables, refs_, conn) = replica_with_tables();
    let path = dir.path().join("state.db");
    let pconn = crate::replica::open_connection(&path, &refs_).unwrap();
    let book = crate::replica::open_connection(&path, &refs_).unwrap();
    let mut applier = Applier::new(&conn, refs_.clone()).unwrap();
    for (i, t) in tables.iter().enumerate() {
        applier.set_schema(i, t).unwrap();
    }
    let cfgs = vec![
        view("named", "n:{name}:{id}", "SELECT id, name FROM app WHERE status = 'on'", &[]),
        view("grouped", "g:{grp}:{id}", "SELECT id, grp FROM app", &[]),
        view("whole", "w:{id}", "SELECT id, name FROM app", &[]),
        view("summed", "s:{grp}", "SELECT grp, count(*) AS n FROM app GROUP BY grp", &[]),
    ];
    let mc = MemcachedConfig { max_item_size: 400, ..mc(Codec::Msgpack) };
    let vs = ViewSet::compile(&pconn, &cfgs, &mc, &refs_).unwrap();
    for v in vs.views() {
        assert!(v.incremental().is_ok(), "{}", v.maintenance());
    }
    let mut published = Published::load(&book).unwrap();
    let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
    let mut scratch = Scratch::default();
    let mut seq = 0u64;
    // Applies one transaction of (before, after) images of `app` and
    // publishes it incrementally; per view, the rejections (as logged)
    // and the memcached ops.
    let mut step = |changes: &[(Option<Row>, Option<Row>)], full: bool| -> Vec<(Vec<String>, Vec<String>)> {
        applier.begin().unwrap();
        for (before, after) in changes {
            let (b, a) = (before.as_deref().map(refs), after.as_deref().map(refs));
            let change = match (&b, &a) {
                (None, Some(a)) => RowChange::Insert(a),
                (Some(b), None) => RowChange::Delete(b),
                (Some(b), Some(a)) => RowChange::Update { before: b, after: a },
                (None, None) => unreachable!(),
            };
            applier.apply(Action::Row { table: 0, change }).unwrap();
        }
        seq += 1;
        let cp = Checkpoint { position: BinlogPosition::new("b.000001", seq), gtid: None };
        applier.apply(Action::Commit { checkpoint: &cp, consistent: true }).unwrap();
        let changes = applier.take_changes();
        let touched: HashSet<String> = [tables[0].table.sqlite_name()].into();
        pconn.execute_batch("BEGIN").unwrap();
        let mut out = Vec::new();
        for i in 0..vs.views().len() {
            let c = if full {
                vs.compute(&pconn, i, now, &mut scratch).unwrap()
            } else {
                assert!(vs.can_increment(i, &touched, &changes));
                vs.compute_incremental(&pconn, i, &touched, &changes, now, &mut scratch)
                    .unwrap()
                    .unwrap_or_else(|| panic!("view {} fell back to a full computation", vs.views()[i].name()))
            };
            let rejected: Vec<String> = c.rejected.iter().map(|r| format!("{}: {r}", r.reason())).collect();
            let plan = published.diff(&book, vec![c], &vs).unwrap();
            published.record(&book, &plan.changes, None).unwrap();
            out.push((rejected, super::tests::ops_summary(&plan.ops)));
        }
        pconn.execute_batch("COMMIT").unwrap();
        out
    };
    let r = step(&[(None, Some(app_row(1, "ok", "on", Some(1))))], true);
    assert!(r.iter().all(|(rej, _)| rej.is_empty()), "{r:?}");
    assert_eq!(r[0].1, ["set p:n:ok:1"]);

    // The only row of the batch gets a name with a space: its new key is
    // rejected (not silently skipped), the old one deleted.
    let r = step(&[(Some(app_row(1, "ok", "on", Some(1))), Some(app_row(1, "has space", "on", Some(1))))], false);
    assert_eq!(r[0].0.len(), 1, "{r:?}");
    assert!(r[0].0[0].starts_with("bad_key: view \"named\", key \"p:n:has space:1\""), "{r:?}");
    assert_eq!(r[0].1, ["delete p:n:ok:1"]);
    assert!(r[1].0.is_empty() && r[2].0.is_empty() && r[3].0.is_empty(), "{r:?}");

    // A NULL key column: rejected on the incremental path too, the value
    // of the old key deleted; a grouped view rejects its NULL group.
    let r = step(&[(Some(app_row(1, "has space", "on", Some(1))), Some(app_row(1, "fine", "on", None)))], false);
    assert_eq!(r[1].0, ["key_column: view \"grouped\": key column \"grp\" is NULL; the row is not written"], "{r:?}");
    assert_eq!(r[1].1, ["delete p:g:1:1"]);
    assert_eq!(r[3].0, ["key_column: view \"summed\": key column \"grp\" is NULL; the row is not written"], "{r:?}");
    assert_eq!(r[3].1, ["delete p:s:1"]);
    assert!(r[0].0.is_empty(), "{r:?}");
    assert_eq!(r[0].1, ["set p:n:fine:1"]);

    // A row the view filters out is not reported, whatever its key.
    let r = step(&[(None, Some(app_row(2, "x y", "off", Some(2))))], false);
    assert!(r[0].0.is_empty() && r[0].1.is_empty(), "{r:?}");
    assert_eq!(r[2].1, ["set p:w:2"]);

    // A value too large: rejected, the value published before deleted.
    let long = "l".repeat(500);
    let r = step(&[(Some(app_row(2, "x y", "off", Some(2))), Some(app_row(2, &long, "off", Some(2))))], false);
    assert_eq!(r[2].0.len(), 1, "{r:?}");
    assert!(r[2].0[0].starts_with("too_large: view \"whole\", key \"p:w:2\""), "{r:?}");
    assert_eq!(r[2].1, ["delete p:w:2"]);

    // A deleted row with a NULL key column is gone from the view: nothing
    // to report.
    let r = step(&[(Some(app_row(1, "fine", "on", None)), None)], false);
    assert!(r[1].0.is_empty() && r[3].0.is_empty(), "{r:?}");
    assert_eq!(r[0].1, ["delete p:n:fine:1"]);

    // What a full computation now rejects: the same rows.
    let r = step(&[], true);
    let all: Vec<&String> = r.iter().flat_map(|(rej, _)| rej).collect();
    assert_eq!(all.len(), 1, "{r:?}");
    assert!(all[0].starts_with("too_large: view \"whole\", key \"p:w:2\""), "{r:?}");
}
