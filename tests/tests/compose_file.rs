//! docker-compose.yml cannot run on CI machines (no Docker engine), so its
//! structure is checked instead: the services, KRaft without ZooKeeper, the
//! ports the README points at, health checks, and persistent volumes.

use yaml_rust2::{Yaml, YamlLoader};

fn compose() -> Yaml {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../docker-compose.yml");
    let text = std::fs::read_to_string(path).expect("docker-compose.yml at the repository root");
    YamlLoader::load_from_str(&text)
        .expect("valid YAML")
        .remove(0)
}

fn service<'a>(doc: &'a Yaml, name: &str) -> &'a Yaml {
    let s = &doc["services"][name];
    assert!(!s.is_badvalue(), "service {name} is missing");
    s
}

fn env(service: &Yaml, var: &str) -> String {
    match &service["environment"][var] {
        Yaml::String(s) => s.clone(),
        Yaml::Integer(i) => i.to_string(),
        other => panic!("environment variable {var}: {other:?}"),
    }
}

fn ports(service: &Yaml) -> Vec<String> {
    service["ports"]
        .as_vec()
        .expect("ports list")
        .iter()
        .map(|p| p.as_str().expect("port mapping as a string").to_owned())
        .collect()
}

#[test]
fn has_kafka_rabbitmq_and_kafka_ui_and_nothing_else() {
    let doc = compose();
    let names: Vec<&str> = doc["services"]
        .as_hash()
        .expect("services map")
        .keys()
        .map(|k| k.as_str().unwrap())
        .collect();
    assert_eq!(names, ["kafka", "rabbitmq", "kafka-ui"]);
}

#[test]
fn kafka_runs_in_kraft_mode_on_localhost_9092() {
    let doc = compose();
    let kafka = service(&doc, "kafka");
    assert!(
        doc["services"]["zookeeper"].is_badvalue(),
        "no ZooKeeper in KRaft mode"
    );
    assert_eq!(env(kafka, "KAFKA_PROCESS_ROLES"), "broker,controller");
    assert!(env(kafka, "KAFKA_CONTROLLER_QUORUM_VOTERS").starts_with("1@kafka:"));
    assert!(!env(kafka, "CLUSTER_ID").is_empty());
    assert!(kafka["environment"]["KAFKA_ZOOKEEPER_CONNECT"].is_badvalue());
    // The README tells users KAFKA_BROKERS=localhost:9092: it must be advertised.
    assert!(env(kafka, "KAFKA_ADVERTISED_LISTENERS").contains("://localhost:9092"));
    assert_eq!(ports(kafka), ["9092:9092"]);
}

#[test]
fn rabbitmq_has_amqp_and_management_ports() {
    let doc = compose();
    let rabbit = service(&doc, "rabbitmq");
    assert!(rabbit["image"].as_str().unwrap().contains("management"));
    assert_eq!(ports(rabbit), ["5672:5672", "15672:15672"]);
}

#[test]
fn kafka_ui_reaches_kafka_on_the_internal_listener_once_it_is_healthy() {
    let doc = compose();
    let ui = service(&doc, "kafka-ui");
    let internal = env(ui, "KAFKA_CLUSTERS_0_BOOTSTRAPSERVERS");
    assert!(env(service(&doc, "kafka"), "KAFKA_ADVERTISED_LISTENERS").contains(&internal));
    assert_eq!(
        ui["depends_on"]["kafka"]["condition"].as_str(),
        Some("service_healthy")
    );
    assert_eq!(ports(ui), ["8080:8080"]);
}

#[test]
fn every_service_has_a_health_check() {
    let doc = compose();
    for name in ["kafka", "rabbitmq", "kafka-ui"] {
        let test = &service(&doc, name)["healthcheck"]["test"];
        let cmd = test
            .as_vec()
            .unwrap_or_else(|| panic!("{name}: healthcheck.test list"));
        assert!(
            matches!(cmd[0].as_str(), Some("CMD") | Some("CMD-SHELL")) && cmd.len() >= 2,
            "{name}: healthcheck test {cmd:?}"
        );
    }
}

#[test]
fn broker_data_lives_in_declared_volumes() {
    let doc = compose();
    let declared = doc["volumes"].as_hash().expect("top-level volumes");
    for (name, path) in [
        ("kafka", "/var/lib/kafka/data"),
        ("rabbitmq", "/var/lib/rabbitmq"),
    ] {
        let mounts = service(&doc, name)["volumes"].as_vec().expect("volumes");
        let mount = mounts
            .iter()
            .filter_map(Yaml::as_str)
            .find(|m| m.ends_with(&format!(":{path}")))
            .unwrap_or_else(|| panic!("{name}: no volume at {path}"));
        let volume = mount.split(':').next().unwrap();
        assert!(
            declared.contains_key(&Yaml::String(volume.into())),
            "{name}: volume {volume} is not declared"
        );
    }
}
