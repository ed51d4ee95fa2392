//! The parts of the `raftkv` command-line client that are worth testing on their own: how keys and
//! values are typed and printed, and how a `raftkv txn` is written down.
//!
//! A txn is written as etcdctl writes one: compares such as `mod("k") > "3"` or `value(k) = v`, and
//! requests such as `put k v`, `get k`, `del k`. Words are split as a POSIX shell splits them (so
//! quotes group), by the `shlex` crate. The same txn can come from a JSON file (see [`TxnFile`]).

use base64::Engine as _;
use serde::Deserialize;

use crate::pb::v1 as pb;

/// Targets quieted by default, and the directive that quiets each. openraft's heartbeat worker warns
/// on every failed heartbeat, tens a second for each peer that is down; raftkv's network reports such
/// a peer instead, rate-limited (network/backoff.rs). A filter that names the target gets them back.
const QUIETED: &[(&str, &str)] = &[
    (
        "openraft::core::heartbeat",
        "openraft::core::heartbeat=error",
    ),
    // The fault harness's FUSE mounts (fuser): a line per mount and per unmount, and a warning for
    // each unmount of a mount that is already gone; the harness reports its power cuts itself.
    ("fuser", "fuser=error"),
];

/// The log setup of every raftkv binary (the server, the CLI and the tools beside it): `RAFTKV_LOG`
/// or a default that keeps dependencies' chatter out, to standard error.
pub fn init_tracing() {
    let spec = std::env::var("RAFTKV_LOG").ok();
    let mut filter = spec
        .as_deref()
        .and_then(|s| tracing_subscriber::EnvFilter::try_new(s).ok())
        .unwrap_or_else(|| {
            tracing_subscriber::EnvFilter::new("info,openraft=warn,sled=warn,h2=warn,tower=warn")
        });
    for (target, directive) in QUIETED {
        let named = spec.as_deref().is_some_and(|s| s.contains(target));
        if let (false, Ok(directive)) = (named, directive.parse()) {
            filter = filter.add_directive(directive);
        }
    }
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // Colour only for people: logs redirected to files stay plain text.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_target(false)
        .init();
}

/// The exit status of a tool beside the CLI (raftkv-jepsen, raftkv-bench): its own, or 2 with the
/// error printed when it could not run.
pub fn tool_exit(
    result: Result<std::process::ExitCode, impl std::fmt::Display>,
) -> std::process::ExitCode {
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::from(2)
        }
    }
}

/// How keys and values are typed on the command line and printed.
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
pub enum Encoding {
    /// UTF-8 text; bytes that are not UTF-8 print as U+FFFD.
    #[default]
    Text,
    Hex,
    Base64,
}

impl Encoding {
    pub fn decode(self, s: &str) -> Result<Vec<u8>, String> {
        match self {
            Encoding::Text => Ok(s.as_bytes().to_vec()),
            Encoding::Hex => hex::decode(s).map_err(|e| format!("{s:?} is not hex: {e}")),
            Encoding::Base64 => base64::engine::general_purpose::STANDARD
                .decode(s)
                .map_err(|e| format!("{s:?} is not base64: {e}")),
        }
    }

    pub fn encode(self, bytes: &[u8]) -> String {
        match self {
            Encoding::Text => String::from_utf8_lossy(bytes).into_owned(),
            Encoding::Hex => hex::encode(bytes),
            Encoding::Base64 => base64::engine::general_purpose::STANDARD.encode(bytes),
        }
    }
}

/// The smallest key after `key`: where the next page of a scan starts.
pub fn key_after(key: &[u8]) -> Vec<u8> {
    let mut next = Vec::with_capacity(key.len() + 1);
    next.extend_from_slice(key);
    next.push(0);
    next
}

/// Parses a compare: `TARGET(KEY) OP OPERAND`, TARGET one of `value`/`val`, `version`/`ver`,
/// `mod`/`mod_revision`, `create`/`create_revision`, OP one of `=`, `!=`, `>`, `<`. KEY and a value
/// OPERAND are in `enc`; revisions and versions are numbers.
pub fn parse_compare(text: &str, enc: Encoding) -> Result<pb::Compare, String> {
    let words = shlex::split(text).ok_or_else(|| format!("compare {text:?}: unbalanced quotes"))?;
    let [target_key, op, operand] = words.as_slice() else {
        return Err(format!(
            "compare {text:?} is not `TARGET(KEY) OP VALUE` (e.g. `mod(\"k\") > 3`, `value(k) = v`)"
        ));
    };
    let (target, key) = target_key
        .split_once('(')
        .and_then(|(t, rest)| rest.strip_suffix(')').map(|k| (t, k)))
        .ok_or_else(|| format!("compare {text:?}: {target_key:?} is not TARGET(KEY)"))?;
    let key = enc.decode(key)?;
    let result = compare_op(op)
        .ok_or_else(|| format!("compare {text:?}: operator {op:?} is not one of =, !=, >, <"))?;
    let number = |what: &str| {
        operand
            .parse::<u64>()
            .map_err(|_| format!("compare {text:?}: {what} {operand:?} is not a number"))
    };
    let target = match target {
        "value" | "val" => pb::compare::Target::Value(enc.decode(operand)?),
        "version" | "ver" => pb::compare::Target::Version(number("version")?),
        "mod" | "mod_revision" => pb::compare::Target::ModRevision(number("revision")?),
        "create" | "create_revision" => pb::compare::Target::CreateRevision(number("revision")?),
        other => {
            return Err(format!(
                "compare {text:?}: target {other:?} is not value, version, mod or create"
            ));
        }
    };
    Ok(pb::Compare {
        key,
        result: result as i32,
        target: Some(target),
    })
}

fn compare_op(op: &str) -> Option<pb::CompareResult> {
    Some(match op {
        "=" | "==" => pb::CompareResult::Equal,
        "!=" => pb::CompareResult::NotEqual,
        ">" => pb::CompareResult::Greater,
        "<" => pb::CompareResult::Less,
        _ => return None,
    })
}

/// Parses a request: `put KEY VALUE`, `get KEY` or `del KEY` (`delete` too), with `--prev-kv` after
/// put or del to have the previous pair returned.
pub fn parse_op(text: &str, enc: Encoding) -> Result<pb::Op, String> {
    let words = shlex::split(text).ok_or_else(|| format!("request {text:?}: unbalanced quotes"))?;
    let prev_kv = words.iter().any(|w| w == "--prev-kv");
    let words: Vec<&str> = words
        .iter()
        .map(String::as_str)
        .filter(|w| *w != "--prev-kv")
        .collect();
    let op = match words.as_slice() {
        ["put", key, value] => pb::op::Op::Put(pb::PutRequest {
            key: enc.decode(key)?,
            value: enc.decode(value)?,
            prev_kv,
            lease: 0,
        }),
        ["get", key] if !prev_kv => pb::op::Op::Get(pb::GetRequest {
            key: enc.decode(key)?,
            consistency: 0,
            min_revision: 0,
        }),
        ["del" | "delete", key] => pb::op::Op::Delete(pb::DeleteRequest {
            key: enc.decode(key)?,
            prev_kv,
        }),
        _ => {
            return Err(format!(
                "request {text:?} is not `put KEY VALUE`, `get KEY` or `del KEY` \
                 (`--prev-kv` after put or del)"
            ));
        }
    };
    Ok(pb::Op { op: Some(op) })
}

/// A txn in a JSON file, in `raftkv txn --file`. Keys and values are in the `--hex`/`--base64`
/// encoding if one is given:
///
/// ```json
/// {"compare": ["mod(\"k\") = 0", {"key": "k", "target": "version", "result": "<", "operand": "3"}],
///  "success": ["put k v", {"put": {"key": "k", "value": "v", "prev_kv": true}}],
///  "failure": [{"get": {"key": "k"}}]}
/// ```
#[derive(Deserialize, Debug, Default)]
#[serde(deny_unknown_fields)]
pub struct TxnFile {
    #[serde(default)]
    pub compare: Vec<CompareSpec>,
    #[serde(default)]
    pub success: Vec<OpSpec>,
    #[serde(default)]
    pub failure: Vec<OpSpec>,
}

#[derive(Deserialize, Debug)]
#[serde(untagged)]
pub enum CompareSpec {
    /// The same text as `--compare`.
    Text(String),
    Fields {
        key: String,
        /// value, version, mod or create.
        target: String,
        /// =, !=, > or <.
        result: String,
        operand: serde_json::Value,
    },
}

#[derive(Deserialize, Debug)]
#[serde(untagged)]
pub enum OpSpec {
    /// The same text as `--success`/`--failure`.
    Text(String),
    Put {
        put: KeyValueSpec,
    },
    Get {
        get: KeySpec,
    },
    Delete {
        delete: KeySpec,
    },
}

#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields)]
pub struct KeyValueSpec {
    pub key: String,
    pub value: String,
    #[serde(default)]
    pub prev_kv: bool,
    #[serde(default)]
    pub lease: u64,
}

#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields)]
pub struct KeySpec {
    pub key: String,
    #[serde(default)]
    pub prev_kv: bool,
}

impl TxnFile {
    pub fn into_request(self, enc: Encoding) -> Result<pb::TxnRequest, String> {
        let compare = self
            .compare
            .into_iter()
            .map(|c| match c {
                CompareSpec::Text(t) => parse_compare(&t, enc),
                CompareSpec::Fields {
                    key,
                    target,
                    result,
                    operand,
                } => compare_fields(key, &target, &result, operand, enc),
            })
            .collect::<Result<_, _>>()?;
        let ops = |ops: Vec<OpSpec>| -> Result<Vec<pb::Op>, String> {
            ops.into_iter()
                .map(|o| {
                    let op = match o {
                        OpSpec::Text(t) => return parse_op(&t, enc),
                        OpSpec::Put { put } => pb::op::Op::Put(pb::PutRequest {
                            key: enc.decode(&put.key)?,
                            value: enc.decode(&put.value)?,
                            prev_kv: put.prev_kv,
                            lease: put.lease,
                        }),
                        OpSpec::Get { get } if !get.prev_kv => pb::op::Op::Get(pb::GetRequest {
                            key: enc.decode(&get.key)?,
                            consistency: 0,
                            min_revision: 0,
                        }),
                        OpSpec::Get { .. } => return Err("get has no prev_kv".into()),
                        OpSpec::Delete { delete } => pb::op::Op::Delete(pb::DeleteRequest {
                            key: enc.decode(&delete.key)?,
                            prev_kv: delete.prev_kv,
                        }),
                    };
                    Ok(pb::Op { op: Some(op) })
                })
                .collect()
        };
        Ok(pb::TxnRequest {
            compare,
            success: ops(self.success)?,
            failure: ops(self.failure)?,
        })
    }
}

fn compare_fields(
    key: String,
    target: &str,
    result: &str,
    operand: serde_json::Value,
    enc: Encoding,
) -> Result<pb::Compare, String> {
    let operand = match operand {
        serde_json::Value::String(s) => s,
        serde_json::Value::Number(n) => n.to_string(),
        other => return Err(format!("compare operand {other} is not a string or number")),
    };
    let result = compare_op(result)
        .ok_or_else(|| format!("compare result {result:?} is not =, !=, >, <"))?;
    let number = || {
        operand
            .parse::<u64>()
            .map_err(|_| format!("compare operand {operand:?} is not a number"))
    };
    let target = match target {
        "value" | "val" => pb::compare::Target::Value(enc.decode(&operand)?),
        "version" | "ver" => pb::compare::Target::Version(number()?),
        "mod" | "mod_revision" => pb::compare::Target::ModRevision(number()?),
        "create" | "create_revision" => pb::compare::Target::CreateRevision(number()?),
        other => {
            return Err(format!(
                "compare target {other:?} is not value, version, mod or create"
            ));
        }
    };
    Ok(pb::Compare {
        key: enc.decode(&key)?,
        result: result as i32,
        target: Some(target),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodings_round_trip_binary_bytes() {
        let bytes = [0u8, 0xff, 0x80, b'a'];
        for enc in [Encoding::Hex, Encoding::Base64] {
            assert_eq!(enc.decode(&enc.encode(&bytes)).unwrap(), bytes);
        }
        assert_eq!(Encoding::Hex.encode(&bytes), "00ff8061");
        assert!(Encoding::Hex.decode("zz").is_err());
        assert!(Encoding::Base64.decode("!!").is_err());
    }

    #[test]
    fn compares_parse_as_etcdctl_writes_them() {
        let c = parse_compare(r#"mod("key 1") > "0""#, Encoding::Text).unwrap();
        assert_eq!(c.key, b"key 1");
        assert_eq!(c.result, pb::CompareResult::Greater as i32);
        assert_eq!(c.target, Some(pb::compare::Target::ModRevision(0)));
        let c = parse_compare("value(k) != v", Encoding::Text).unwrap();
        assert_eq!(c.target, Some(pb::compare::Target::Value(b"v".to_vec())));
        assert_eq!(c.result, pb::CompareResult::NotEqual as i32);
        let c = parse_compare("ver(00ff) = 2", Encoding::Hex).unwrap();
        assert_eq!(
            (c.key, c.target),
            (vec![0, 0xff], Some(pb::compare::Target::Version(2)))
        );
        for bad in [
            "mod(k) > x",
            "mod(k) >= 1",
            "size(k) = 1",
            "mod k > 1",
            "mod(k) >",
            "mod(\"k) > 1",
        ] {
            assert!(parse_compare(bad, Encoding::Text).is_err(), "{bad}");
        }
    }

    #[test]
    fn requests_parse() {
        let op = parse_op("put 'a b' v --prev-kv", Encoding::Text).unwrap();
        assert_eq!(
            op.op,
            Some(pb::op::Op::Put(pb::PutRequest {
                key: b"a b".to_vec(),
                value: b"v".to_vec(),
                prev_kv: true,
                lease: 0,
            }))
        );
        assert!(matches!(
            parse_op("del k", Encoding::Text).unwrap().op,
            Some(pb::op::Op::Delete(_))
        ));
        assert!(matches!(
            parse_op("get k", Encoding::Text).unwrap().op,
            Some(pb::op::Op::Get(_))
        ));
        for bad in ["put k", "get", "get k --prev-kv", "frob k", "put a b c"] {
            assert!(parse_op(bad, Encoding::Text).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_txn_file_mixes_text_and_fields() {
        let file: TxnFile = serde_json::from_str(
            r#"{"compare": ["mod(k) = 0", {"key": "k", "target": "version", "result": "<", "operand": 3}],
                "success": ["put k v", {"put": {"key": "k2", "value": "v2", "prev_kv": true}}],
                "failure": [{"get": {"key": "k"}}, {"delete": {"key": "k"}}]}"#,
        )
        .unwrap();
        let req = file.into_request(Encoding::Text).unwrap();
        assert_eq!(req.compare.len(), 2);
        assert_eq!(req.compare[1].target, Some(pb::compare::Target::Version(3)));
        assert_eq!(req.success.len(), 2);
        assert_eq!(req.failure.len(), 2);
        assert!(serde_json::from_str::<TxnFile>(r#"{"compares": []}"#).is_err());
    }
}
