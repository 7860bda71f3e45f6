//! A small CloudFormation evaluator: enough of the intrinsic functions to read
//! the templates in `infra/` as a deployed stack would see them.
//!
//! The cross-check tests compare what the templates *resolve to* (the table
//! name in a policy ARN, the queue URL in user-data, the cluster name in an
//! alarm's dimensions) with what the agent expects. Resource attributes that
//! only exist after deployment are synthesized in the shape AWS returns
//! (`Ref` of a queue is its URL, `GetAtt Table.Arn` a table ARN), from the
//! resource's own name property, so a name that disagrees still shows.

pub mod commands;

use serde_json::{Map, Value};
use std::collections::{BTreeMap, BTreeSet};

/// Account and region the synthesized ARNs use (documentation values).
pub const ACCOUNT: &str = "123456789012";
pub const REGION: &str = "eu-west-1";

/// Three distinct AZs, as the network stack requires.
pub const AZS: [(&str, &str); 3] = [
    ("AvailabilityZoneA", "eu-west-1a"),
    ("AvailabilityZoneB", "eu-west-1b"),
    ("AvailabilityZoneC", "eu-west-1c"),
];

/// The repo's `infra/<file>`, parsed.
pub fn repo_template(file: &str) -> Value {
    let path = crate::workspace::workspace_root().join("infra").join(file);
    let text =
        std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{} is not JSON: {e}", path.display()))
}

/// A network stack (`template`: infra/network.json or an edit of it) at
/// `stage` for the cluster `name`.
pub fn network_stack(template: Value, stage: &str, name: &str) -> Stack {
    let mut params = vec![("Stage", stage), ("ClusterName", name)];
    params.extend(AZS);
    Stack::new(template, &params)
}

/// A cluster stack (`template`: infra/cluster.json or an edit of it) at
/// `stage` for `name`, importing the repo's network stack of the same stage
/// and name (as CloudFormation resolves `Fn::ImportValue`). kubeboot's
/// cluster name is `<stage>-<name>`.
pub fn cluster_stack(template: Value, stage: &str, name: &str) -> Stack {
    Stack::new(
        template,
        &[
            ("Stage", stage),
            ("ClusterName", name),
            ("AlarmEmail", "oncall@example.com"),
            ("ImageId", "ami-0123456789abcdef0"),
        ],
    )
    .importing(network_stack(repo_template("network.json"), stage, name).exports())
}

/// The user-data an instance of `launch_template` is handed (EC2 decodes
/// the template's `Fn::Base64`).
pub fn launch_user_data(stack: &Stack, launch_template: &str) -> String {
    scalar(&stack.prop(launch_template, "LaunchTemplateData")["UserData"])
}

/// A template with parameter values, ready to evaluate.
#[derive(Debug, Clone)]
pub struct Stack {
    pub template: Value,
    pub params: BTreeMap<String, String>,
    /// Other stacks' exports, by export name, for `Fn::ImportValue`.
    pub imports: BTreeMap<String, Value>,
}

impl Stack {
    /// `template` with `params`; parameters not given take their Default.
    pub fn new(template: Value, params: &[(&str, &str)]) -> Stack {
        let mut all: BTreeMap<String, String> = BTreeMap::new();
        if let Some(declared) = template["Parameters"].as_object() {
            for (name, decl) in declared {
                if let Some(default) = decl.get("Default") {
                    all.insert(name.clone(), scalar(default));
                }
            }
        }
        for (k, v) in params {
            all.insert(k.to_string(), v.to_string());
        }
        Stack {
            template,
            params: all,
            imports: BTreeMap::new(),
        }
    }

    /// This stack with `exports` (another stack's [`Stack::exports`]) to
    /// import from. CloudFormation resolves `Fn::ImportValue` only against
    /// exports that exist in the account and region when the stack is
    /// created or updated.
    pub fn importing(mut self, exports: BTreeMap<String, Value>) -> Stack {
        self.imports.extend(exports);
        self
    }

    /// The outputs this stack exports, by export name, evaluated (an
    /// output whose Condition is false is not created, nor its export).
    pub fn exports(&self) -> BTreeMap<String, Value> {
        let mut out = BTreeMap::new();
        for (_, o) in self.template["Outputs"].as_object().into_iter().flatten() {
            if let Some(c) = o.get("Condition") {
                if !self.condition(str_of(c)) {
                    continue;
                }
            }
            if let Some(e) = o.get("Export") {
                out.insert(scalar(&self.eval(&e["Name"])), self.eval(&o["Value"]));
            }
        }
        out
    }

    /// Every export name this template imports, evaluated with its parameters.
    pub fn import_names(&self) -> BTreeSet<String> {
        let mut found = Vec::new();
        find_all(&self.template["Resources"], "Fn::ImportValue", &mut found);
        find_all(&self.template["Outputs"], "Fn::ImportValue", &mut found);
        found.iter().map(|a| scalar(&self.eval(a))).collect()
    }

    /// The resources `id` names directly: `Ref`, `Fn::GetAtt`, `${X}` and
    /// `${X.Attr}` in `Fn::Sub`, and `DependsOn`. CloudFormation creates
    /// these before `id` and deletes them after it.
    pub fn dependencies(&self, id: &str) -> BTreeSet<String> {
        let r = self.resource(id);
        let mut out = BTreeSet::new();
        let known = |name: &str| self.resources().contains_key(name);
        match &r["DependsOn"] {
            Value::String(d) => {
                out.insert(d.clone());
            }
            Value::Array(ds) => out.extend(ds.iter().map(|d| str_of(d).to_string())),
            _ => {}
        }
        let mut refs = Vec::new();
        find_all(&r["Properties"], "Ref", &mut refs);
        out.extend(
            refs.iter()
                .filter_map(|v| v.as_str())
                .filter(|n| known(n))
                .map(String::from),
        );
        let mut atts = Vec::new();
        find_all(&r["Properties"], "Fn::GetAtt", &mut atts);
        for a in atts {
            let target = match a {
                Value::Array(p) => p.first().map(scalar),
                Value::String(s) => s.split('.').next().map(String::from),
                _ => None,
            };
            out.extend(target.filter(|n| known(n)));
        }
        let mut subs = Vec::new();
        find_all(&r["Properties"], "Fn::Sub", &mut subs);
        for sub in subs {
            let (text, vars) = match sub {
                Value::String(t) => (t.as_str(), None),
                Value::Array(a) => (str_of(&a[0]), a[1].as_object()),
                _ => continue,
            };
            let mut rest = text;
            while let Some(start) = rest.find("${") {
                let after = &rest[start + 2..];
                let end = after.find('}').unwrap_or(after.len());
                let name = &after[..end];
                rest = &after[end.min(after.len())..];
                if name.starts_with('!') || vars.is_some_and(|v| v.contains_key(name)) {
                    continue;
                }
                let target = name.split('.').next().unwrap_or_default();
                if known(target) {
                    out.insert(target.to_string());
                }
            }
        }
        out
    }

    /// Every resource `id` depends on, directly or through others.
    pub fn dependency_closure(&self, id: &str) -> BTreeSet<String> {
        let mut seen = BTreeSet::new();
        let mut todo = vec![id.to_string()];
        while let Some(next) = todo.pop() {
            for d in self.dependencies(&next) {
                if seen.insert(d.clone()) {
                    todo.push(d);
                }
            }
        }
        seen
    }

    /// The template's `Rules` whose assertions fail for these parameters
    /// (CloudFormation refuses to create or update the stack), as
    /// `rule: AssertDescription`.
    pub fn rule_failures(&self) -> Vec<String> {
        let mut out = Vec::new();
        for (name, rule) in self.template["Rules"].as_object().into_iter().flatten() {
            if let Some(c) = rule.get("RuleCondition") {
                if !self.truth(c) {
                    continue;
                }
            }
            for a in rule["Assertions"].as_array().into_iter().flatten() {
                if !self.truth(&a["Assert"]) {
                    out.push(format!("{name}: {}", scalar(&a["AssertDescription"])));
                }
            }
        }
        out
    }

    /// The resources, by logical id.
    pub fn resources(&self) -> &Map<String, Value> {
        self.template["Resources"]
            .as_object()
            .expect("template has Resources")
    }

    /// One resource's definition.
    pub fn resource(&self, id: &str) -> &Value {
        self.resources()
            .get(id)
            .unwrap_or_else(|| panic!("template has no resource {id}"))
    }

    /// The logical ids of resources of `kind` (e.g. `AWS::IAM::Role`), sorted.
    pub fn of_type(&self, kind: &str) -> Vec<String> {
        self.resources()
            .iter()
            .filter(|(_, r)| r["Type"] == kind)
            .map(|(id, _)| id.clone())
            .collect()
    }

    /// A resource's property, evaluated.
    pub fn prop(&self, id: &str, name: &str) -> Value {
        self.eval(&self.resource(id)["Properties"][name])
    }

    /// `value` with every intrinsic function resolved.
    pub fn eval(&self, value: &Value) -> Value {
        match value {
            Value::Array(items) => Value::Array(items.iter().map(|v| self.eval(v)).collect()),
            Value::Object(map) if map.len() == 1 => {
                let (key, arg) = map.iter().next().expect("one entry");
                match key.as_str() {
                    "Ref" => self.ref_value(str_of(arg)),
                    "Fn::ImportValue" => {
                        let name = scalar(&self.eval(arg));
                        self.imports.get(&name).cloned().unwrap_or_else(|| {
                            panic!("Fn::ImportValue {name}: no stack exports it (CloudFormation refuses the stack)")
                        })
                    }
                    "Fn::Split" => {
                        let a = arg.as_array().expect("Split list");
                        let text = scalar(&self.eval(&a[1]));
                        Value::Array(
                            text.split(str_of(&a[0]))
                                .map(|p| Value::String(p.to_string()))
                                .collect(),
                        )
                    }
                    "Fn::GetAtt" => {
                        let parts: Vec<&str> = match arg {
                            Value::Array(a) => a.iter().map(str_of).collect(),
                            Value::String(s) => s.splitn(2, '.').collect(),
                            other => panic!("Fn::GetAtt {other}"),
                        };
                        Value::String(self.attribute(parts[0], parts[1]))
                    }
                    "Fn::Sub" => Value::String(self.substitute(arg)),
                    "Fn::FindInMap" => {
                        let a: Vec<String> = arg
                            .as_array()
                            .expect("FindInMap list")
                            .iter()
                            .map(|v| scalar(&self.eval(v)))
                            .collect();
                        self.template["Mappings"][&a[0]][&a[1]][&a[2]].clone()
                    }
                    "Fn::Base64" => self.eval(arg),
                    "Fn::Join" => {
                        let a = arg.as_array().expect("Join list");
                        let parts: Vec<String> = self
                            .eval(&a[1])
                            .as_array()
                            .expect("Join items")
                            .iter()
                            .map(scalar)
                            .collect();
                        Value::String(parts.join(str_of(&a[0])))
                    }
                    "Fn::Select" => {
                        let a = arg.as_array().expect("Select list");
                        let index: usize = scalar(&self.eval(&a[0])).parse().expect("index");
                        self.eval(&a[1])[index].clone()
                    }
                    "Fn::If" => {
                        let a = arg.as_array().expect("If list");
                        if self.condition(str_of(&a[0])) {
                            self.eval(&a[1])
                        } else {
                            self.eval(&a[2])
                        }
                    }
                    _ => {
                        Value::Object(map.iter().map(|(k, v)| (k.clone(), self.eval(v))).collect())
                    }
                }
            }
            Value::Object(map) => {
                Value::Object(map.iter().map(|(k, v)| (k.clone(), self.eval(v))).collect())
            }
            other => other.clone(),
        }
    }

    /// Whether the template's condition `name` holds for these parameters.
    pub fn condition(&self, name: &str) -> bool {
        let def = &self.template["Conditions"][name];
        self.truth(def)
    }

    /// A condition expression (also a rule's `Assert`).
    pub fn truth(&self, def: &Value) -> bool {
        let map = def.as_object().expect("condition is an object");
        let (key, arg) = map.iter().next().expect("one entry");
        let a = arg.as_array();
        match key.as_str() {
            "Fn::Equals" => {
                let a = a.expect("Equals list");
                scalar(&self.eval(&a[0])) == scalar(&self.eval(&a[1]))
            }
            "Fn::Not" => !self.truth(&a.expect("Not list")[0]),
            "Fn::And" => a.expect("And list").iter().all(|c| self.truth(c)),
            "Fn::Or" => a.expect("Or list").iter().any(|c| self.truth(c)),
            "Condition" => self.condition(str_of(arg)),
            other => panic!("unsupported condition {other}"),
        }
    }

    /// `Ref`: a `List<…>` or `CommaDelimitedList` parameter is a list.
    fn ref_value(&self, name: &str) -> Value {
        let kind = scalar(&self.template["Parameters"][name]["Type"]);
        match self.params.get(name) {
            Some(v) if kind.starts_with("List<") || kind == "CommaDelimitedList" => Value::Array(
                v.split(',')
                    .map(|p| Value::String(p.trim().to_string()))
                    .collect(),
            ),
            _ => Value::String(self.reference(name)),
        }
    }

    fn reference(&self, name: &str) -> String {
        match name {
            "AWS::Region" => return REGION.into(),
            "AWS::AccountId" => return ACCOUNT.into(),
            "AWS::Partition" => return "aws".into(),
            "AWS::StackName" => return "kubeboot-stack".into(),
            "AWS::URLSuffix" => return "amazonaws.com".into(),
            _ => {}
        }
        if let Some(v) = self.params.get(name) {
            return v.clone();
        }
        let r = self.resource(name);
        let named = |prop: &str| {
            scalar(&self.eval(&r["Properties"][prop]))
                .trim_matches('"')
                .to_string()
        };
        match r["Type"].as_str().unwrap_or_default() {
            "AWS::SQS::Queue" => format!(
                "https://sqs.{REGION}.amazonaws.com/{ACCOUNT}/{}",
                named("QueueName")
            ),
            "AWS::DynamoDB::Table" => named("TableName"),
            "AWS::S3::Bucket" => named("BucketName"),
            "AWS::Logs::LogGroup" => named("LogGroupName"),
            "AWS::AutoScaling::AutoScalingGroup" => named("AutoScalingGroupName"),
            "AWS::SecretsManager::Secret" => format!(
                "arn:aws:secretsmanager:{REGION}:{ACCOUNT}:secret:{}-AbCdEf",
                named("Name")
            ),
            "AWS::SNS::Topic" => format!("arn:aws:sns:{REGION}:{ACCOUNT}:{}", named("TopicName")),
            "AWS::KMS::Key" => format!("key-{name}"),
            // Ref of an IAM OIDC provider is its ARN: the issuer without https://.
            "AWS::IAM::OIDCProvider" => format!(
                "arn:aws:iam::{ACCOUNT}:oidc-provider/{}",
                named("Url").trim_start_matches("https://")
            ),
            _ => format!("{name}-id"),
        }
    }

    fn attribute(&self, id: &str, attr: &str) -> String {
        let r = self.resource(id);
        let kind = r["Type"].as_str().unwrap_or_default();
        let named = |prop: &str| scalar(&self.eval(&r["Properties"][prop]));
        match (kind, attr) {
            ("AWS::DynamoDB::Table", "Arn") => format!(
                "arn:aws:dynamodb:{REGION}:{ACCOUNT}:table/{}",
                named("TableName")
            ),
            ("AWS::SQS::Queue", "Arn") => {
                format!("arn:aws:sqs:{REGION}:{ACCOUNT}:{}", named("QueueName"))
            }
            ("AWS::SQS::Queue", "QueueName") => named("QueueName"),
            ("AWS::S3::Bucket", "Arn") => format!("arn:aws:s3:::{}", named("BucketName")),
            ("AWS::S3::Bucket", "RegionalDomainName") => {
                format!("{}.s3.{REGION}.amazonaws.com", named("BucketName"))
            }
            // No RoleName: CloudFormation names the role <stack>-<id>-<suffix>.
            ("AWS::IAM::Role", "Arn") => {
                format!("arn:aws:iam::{ACCOUNT}:role/kubeboot-{id}-A1B2C3D4E5F6")
            }
            ("AWS::KMS::Key", "Arn") => format!("arn:aws:kms:{REGION}:{ACCOUNT}:key/key-{id}"),
            ("AWS::Logs::LogGroup", "Arn") => format!(
                "arn:aws:logs:{REGION}:{ACCOUNT}:log-group:{}:*",
                named("LogGroupName")
            ),
            ("AWS::ElasticLoadBalancingV2::LoadBalancer", "DNSName") => format!(
                // AWS keeps the case of the generated load balancer name.
                "internal-{}-0123456789abcdef.elb.{REGION}.amazonaws.com",
                id
            ),
            ("AWS::EC2::LaunchTemplate", "LatestVersionNumber") => "1".into(),
            ("AWS::EC2::VPC", "CidrBlock") => named("CidrBlock"),
            (_, "Arn") => format!("arn:aws:synthesized:{REGION}:{ACCOUNT}:{id}"),
            _ => format!("{id}.{attr}"),
        }
    }

    fn substitute(&self, arg: &Value) -> String {
        let (text, vars) = match arg {
            Value::String(s) => (s.as_str(), Map::new()),
            Value::Array(a) => (str_of(&a[0]), a[1].as_object().cloned().unwrap_or_default()),
            other => panic!("Fn::Sub {other}"),
        };
        let mut out = String::new();
        let mut rest = text;
        while let Some(start) = rest.find("${") {
            out.push_str(&rest[..start]);
            let after = &rest[start + 2..];
            if let Some(literal) = after.strip_prefix('!') {
                // `${!Literal}` is written as `${Literal}`.
                out.push_str("${");
                rest = literal;
                continue;
            }
            let end = after.find('}').expect("unterminated ${ in Fn::Sub");
            let name = &after[..end];
            let value = match vars.get(name) {
                Some(v) => scalar(&self.eval(v)),
                None => match name.split_once('.') {
                    Some((id, attr)) if !name.starts_with("AWS::") => self.attribute(id, attr),
                    _ => self.reference(name),
                },
            };
            out.push_str(&value);
            rest = &after[end + 1..];
        }
        out.push_str(rest);
        out
    }
}

/// A scalar's text (strings unquoted, numbers and booleans as written).
pub fn scalar(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

fn str_of(v: &Value) -> &str {
    v.as_str()
        .unwrap_or_else(|| panic!("expected a string, got {v}"))
}

/// Every value of `key` anywhere under `value` (e.g. every `Fn::FindInMap`).
pub fn find_all<'a>(value: &'a Value, key: &str, out: &mut Vec<&'a Value>) {
    match value {
        Value::Object(map) => {
            for (k, v) in map {
                if k == key {
                    out.push(v);
                }
                find_all(v, key, out);
            }
        }
        Value::Array(items) => items.iter().for_each(|v| find_all(v, key, out)),
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn stack() -> Stack {
        Stack::new(
            json!({
                "Parameters": {"Stage": {"Type": "String"}, "Size": {"Type": "String", "Default": "3"}},
                "Mappings": {"S": {"dev": {"N": "1"}, "production": {"N": "5"}}},
                "Conditions": {"Prod": {"Fn::Equals": [{"Ref": "Stage"}, "production"]}},
                "Resources": {
                    "Q": {"Type": "AWS::SQS::Queue", "Properties": {"QueueName": {"Fn::Sub": "q-${Stage}"}}},
                    "T": {"Type": "AWS::DynamoDB::Table", "Properties": {"TableName": "t"}}
                }
            }),
            &[("Stage", "dev")],
        )
    }

    #[test]
    fn refs_subs_and_attributes_resolve_as_a_deployed_stack_sees_them() {
        let s = stack();
        assert_eq!(
            s.eval(&json!({"Ref": "Q"})),
            json!(format!(
                "https://sqs.{REGION}.amazonaws.com/{ACCOUNT}/q-dev"
            ))
        );
        assert_eq!(
            s.eval(&json!({"Fn::Sub": "${T.Arn}|${Size}|${!Literal}|${AWS::Region}"})),
            json!(format!(
                "arn:aws:dynamodb:{REGION}:{ACCOUNT}:table/t|3|${{Literal}}|{REGION}"
            ))
        );
        assert_eq!(
            s.eval(&json!({"Fn::Sub": ["${X}-y", {"X": {"Ref": "Stage"}}]})),
            json!("dev-y")
        );
    }

    #[test]
    fn mappings_and_conditions_follow_the_stage() {
        let s = stack();
        let n = json!({"Fn::FindInMap": ["S", {"Ref": "Stage"}, "N"]});
        assert_eq!(s.eval(&n), json!("1"));
        assert_eq!(s.eval(&json!({"Fn::If": ["Prod", "a", "b"]})), json!("b"));
        let prod = Stack::new(s.template.clone(), &[("Stage", "production")]);
        assert_eq!(prod.eval(&n), json!("5"));
        assert_eq!(
            prod.eval(&json!({"Fn::If": ["Prod", "a", "b"]})),
            json!("a")
        );
    }

    #[test]
    fn imports_resolve_against_the_other_stacks_exports_and_dependencies_follow_refs() {
        let network = Stack::new(
            json!({
                "Parameters": {"Name": {"Type": "String"}},
                "Resources": {"Vpc": {"Type": "AWS::EC2::VPC", "Properties": {"CidrBlock": "10.0.0.0/16"}}},
                "Outputs": {
                    "Cidr": {"Value": {"Fn::GetAtt": ["Vpc", "CidrBlock"]}, "Export": {"Name": {"Fn::Sub": "${Name}-cidr"}}},
                    "Ids": {"Value": "a,b", "Export": {"Name": {"Fn::Sub": "${Name}-ids"}}}
                }
            }),
            &[("Name", "n")],
        );
        let cluster = Stack::new(
            json!({
                "Parameters": {"Name": {"Type": "String"}, "A": {"Type": "String"}, "B": {"Type": "String"}},
                "Rules": {"Differ": {"Assertions": [{"Assert": {"Fn::Not": [{"Fn::Equals": [{"Ref": "A"}, {"Ref": "B"}]}]}, "AssertDescription": "A and B differ"}]}},
                "Resources": {
                    "Sg": {"Type": "AWS::EC2::SecurityGroup", "Properties": {"Cidr": {"Fn::ImportValue": {"Fn::Sub": "${Name}-cidr"}}}},
                    "Rule": {"Type": "AWS::EC2::SecurityGroupIngress", "Properties": {"GroupId": {"Ref": "Sg"}}},
                    "Group": {"Type": "AWS::AutoScaling::AutoScalingGroup", "DependsOn": "Rule",
                              "Properties": {"Subnets": {"Fn::Split": [",", {"Fn::ImportValue": "n-ids"}]}, "X": {"Fn::Sub": "${Sg.GroupId}-${AWS::Region}-${!Literal}"}}}
                }
            }),
            &[("Name", "n"), ("A", "x"), ("B", "y")],
        )
        .importing(network.exports());
        assert_eq!(
            cluster.import_names(),
            ["n-cidr".to_string(), "n-ids".to_string()].into()
        );
        assert_eq!(cluster.prop("Sg", "Cidr"), json!("10.0.0.0/16"));
        assert_eq!(cluster.prop("Group", "Subnets"), json!(["a", "b"]));
        assert_eq!(
            cluster.dependencies("Group"),
            ["Rule".to_string(), "Sg".to_string()].into()
        );
        assert_eq!(
            cluster.dependency_closure("Group"),
            ["Rule".to_string(), "Sg".to_string()].into()
        );
        assert!(cluster.rule_failures().is_empty());
        let mut same = cluster.clone();
        same.params.insert("B".into(), "x".into());
        assert_eq!(
            same.rule_failures(),
            vec!["Differ: A and B differ".to_string()]
        );
    }

    #[test]
    #[should_panic(expected = "Fn::ImportValue gone: no stack exports it")]
    fn an_import_nobody_exports_is_refused() {
        let s = Stack::new(json!({"Resources": {}}), &[]);
        s.eval(&json!({"Fn::ImportValue": "gone"}));
    }
}
