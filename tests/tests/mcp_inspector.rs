//! MCP with a client people use: the MCP Inspector CLI (npm
//! `@modelcontextprotocol/inspector`, installed into target/mcp-inspector by
//! `make test`) against the built binary — over Streamable HTTP at `/mcp`, and
//! over stdio through `spool mcp`.

mod common;

use common::*;
use serde_json::Value;
use std::path::PathBuf;
use std::process::Command;

fn inspector() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let target = exe.ancestors().nth(3).unwrap();
    let bin = target.join("mcp-inspector/node_modules/.bin/mcp-inspector");
    assert!(
        bin.exists(),
        "{} missing: `make test` installs the MCP Inspector (npm) there",
        bin.display()
    );
    bin
}

/// Run the Inspector CLI; (exit code, the JSON it printed).
fn run(args: &[&str]) -> (i32, Value) {
    let out = Command::new(inspector())
        .args(["--cli", "--format", "json"])
        .args(args)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let v = serde_json::from_str(&text).unwrap_or_else(|_| {
        panic!(
            "not JSON: {text}\nstderr: {}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    (out.status.code().unwrap_or(-1), v)
}

#[test]
fn the_mcp_inspector_remembers_recalls_gets_and_forgets() {
    let dir = tempfile::tempdir().unwrap();
    let s = Server::start(
        dir.path(),
        "[[source]]\nname = \"agents\"\ntoken = \"tok-a\"\nembedding_dims = 3\n",
    );
    let url = s.url("/mcp");
    let auth = "Authorization: Bearer tok-a";
    let http = |method: &[&str]| {
        let mut a = vec![
            url.as_str(),
            "--transport",
            "http",
            "--header",
            auth,
            "--stored-auth-only",
        ];
        a.extend_from_slice(method);
        run(&a)
    };
    let (code, v) = http(&["--method", "tools/list"]);
    assert_eq!(code, 0, "{v}");
    let mut names: Vec<&str> = v["result"]["tools"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["name"].as_str().unwrap())
        .collect();
    names.sort();
    assert_eq!(names, ["forget", "get", "recall", "remember"]);

    let (code, v) = http(&[
        "--method",
        "tools/call",
        "--tool-name",
        "remember",
        "--tool-args-json",
        r#"{"memories":[{"text":"the inspector was here","subject":"visits","embedding":[1,0,0]}],"wait_until_delivered":true}"#,
    ]);
    assert_eq!(code, 0, "{v}");
    let id = v["result"]["structuredContent"]["entries"][0]["id"]
        .as_str()
        .unwrap()
        .to_owned();

    // Over stdio, through `spool mcp` (the token from the environment).
    let base = s.url("");
    let stdio = |method: &[&str]| {
        let mut a: Vec<&str> = method.to_vec();
        a.extend_from_slice(&["-e", "SPOOL_TOKEN=tok-a", "--"]);
        let bin = spool_bin();
        let mut cmd: Vec<String> = a.iter().map(|s| s.to_string()).collect();
        cmd.extend(
            [
                bin.to_str().unwrap(),
                "mcp",
                "--url",
                base.trim_end_matches('/'),
                "--source",
                "agents",
            ]
            .map(str::to_owned),
        );
        let refs: Vec<&str> = cmd.iter().map(String::as_str).collect();
        run(&refs)
    };
    let (code, v) = stdio(&[
        "--method",
        "tools/call",
        "--tool-name",
        "recall",
        "--tool-arg",
        "query=inspector",
    ]);
    assert_eq!(code, 0, "{v}");
    assert_eq!(
        v["result"]["structuredContent"]["hits"][0]["id"],
        id.as_str(),
        "{v}"
    );
    let get = format!("id={id}");
    let (code, v) = stdio(&[
        "--method",
        "tools/call",
        "--tool-name",
        "get",
        "--tool-arg",
        &get,
    ]);
    assert_eq!(code, 0, "{v}");
    assert_eq!(
        v["result"]["structuredContent"]["status"], "delivered",
        "{v}"
    );

    let ids = format!(r#"ids=["{id}"]"#);
    let (code, v) = http(&[
        "--method",
        "tools/call",
        "--tool-name",
        "forget",
        "--tool-arg",
        &ids,
    ]);
    assert_eq!(code, 0, "{v}");
    assert_eq!(v["result"]["structuredContent"]["deleted"], 1, "{v}");
    // A tool error (exit 5) carrying the API's code.
    let (code, v) = http(&[
        "--method",
        "tools/call",
        "--tool-name",
        "get",
        "--tool-arg",
        &get,
    ]);
    assert_eq!(code, 5, "{v}");
    assert_eq!(
        v["result"]["structuredContent"]["error"], "not_found",
        "{v}"
    );
}
