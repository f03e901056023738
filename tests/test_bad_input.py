"""The catalogue of bad input: each case is refused with exactly one line on stderr, naming the
offending thing and the fix, and a non-zero exit; no traceback, and no run left behind that looks
like a result. Cases run the real CLI entry point (lab.cli.main) in this process, so the whole
catalogue costs seconds; test_cli.py runs a few of them as subprocesses too."""

import json
import textwrap
from pathlib import Path

import pytest
from conftest import free_port

from lab.cli import main
from lab.recipe import RECIPES_DIR, load_recipe

SHIPPED = ", ".join(sorted(p.stem for p in RECIPES_DIR.glob("*.yaml")))
TOKEN = "hf_catalogueSECRET42"


def recipe_file(tmp: Path, body: str = "", data=None, data_name: str = "data.json", columns: str = "") -> str:
    """A recipe in tmp with one dataset (written from `data`: JSON-able, or bytes as they are)."""
    if data is not None:
        target = tmp / data_name
        target.write_bytes(data if isinstance(data, bytes) else json.dumps(data, ensure_ascii=False).encode())
    path = tmp / "recipe.yaml"
    dataset = f"  - path: {data_name}\n" + (f"    columns: {columns}\n" if columns else "")
    path.write_text(f"name: bad\ndatasets:\n{dataset}" + textwrap.dedent(body), encoding="utf-8")
    return str(path)


GOOD_ROW = {"instruction": "Who are you?", "output": "I am {{name}}."}


def _model_dir(tmp: Path, files: dict[str, bytes]) -> Path:
    d = tmp / "model"
    d.mkdir()
    for name, content in files.items():
        (d / name).write_bytes(content)
    return d


def _saved_run(runs: Path, recipe_yaml: str) -> Path:
    run = runs / "edited"
    run.mkdir(parents=True)
    (run / "recipe.yaml").write_text(recipe_yaml, encoding="utf-8")
    return run


# (case id, setup(tmp, runs) -> argv, expected stderr line with {tmp} and {runs} filled in)
CASES = [
    # --- recipes and SET= ---
    ("recipe-missing", lambda t, r: ["train", "--recipe", "nope"],
     f"lab train: error: recipe 'nope' not found; shipped recipes: {SHIPPED}"),
    ("set-unknown-key", lambda t, r: ["train", "--hw", "cpu", "--set", "identity.nmae=X"],
     "lab train: error: identity-lora.yaml: unknown key 'identity.nmae' (did you mean name?)"),
    ("set-unknown-train-key", lambda t, r: ["train", "--hw", "cpu", "--set", "train.learning_rat=1"],
     "lab train: error: identity-lora.yaml: unknown key 'train.learning_rat' (not an SFTConfig field) "
     "(did you mean learning_rate?)"),
    ("hw-unknown", lambda t, r: ["train", "--hw", "tpu"],
     "lab train: error: HW='tpu' is not one of auto, cpu, cuda, rocm"),
    ("set-unbalanced-quote", lambda t, r: ["train", "--hw", "cpu", "--set", "identity.author=O'Brien"],
     "lab train: error: SET=\"identity.author=O'Brien\": no closing quotation; quote a value with an apostrophe "
     "in double quotes (identity.author=\"O'Brien\")"),
    ("set-no-equals", lambda t, r: ["train", "--hw", "cpu", "--set", "identity.name"],
     "lab train: error: override 'identity.name' is not key.sub=value (e.g. identity.name=Orion)"),
    ("set-wrong-type-float", lambda t, r: ["train", "--hw", "cpu", "--set", "train.num_train_epochs=abc"],
     "lab train: error: identity-lora.yaml: train.num_train_epochs='abc' is not a valid float"),
    ("set-wrong-type-int", lambda t, r: ["train", "--hw", "cpu", "--set", "train.per_device_train_batch_size=1.5"],
     "lab train: error: identity-lora.yaml: train.per_device_train_batch_size=1.5 is not a valid int"),
    ("set-wrong-type-bool", lambda t, r: ["train", "--hw", "cpu", "--set", "train.gradient_checkpointing=maybe"],
     "lab train: error: identity-lora.yaml: train.gradient_checkpointing='maybe' is not a valid bool"),
    ("set-method", lambda t, r: ["train", "--hw", "cpu", "--set", "method=dora"],
     "lab train: error: identity-lora.yaml: method: Input should be 'lora', 'full' or 'qlora'"),
    ("set-serve-port", lambda t, r: ["train", "--hw", "cpu", "--set", "serve.port=abc"],
     "lab train: error: identity-lora.yaml: serve.port: Input should be a valid integer, unable to parse "
     "string as an integer"),
    ("set-lora-rank", lambda t, r: ["train", "--hw", "cpu", "--set", "lora.r=0"],
     "lab train: error: identity-lora.yaml: lora.r: Input should be greater than or equal to 1"),
    ("epochs-negative", lambda t, r: ["train", "--hw", "cpu", "--set", "train.num_train_epochs=-1"],
     "lab train: error: identity-lora.yaml: train.num_train_epochs=-1 trains nothing; give a number of passes "
     "over the data above 0 (e.g. 3)"),
    ("epochs-zero", lambda t, r: ["train", "--hw", "cpu", "--set", "train.num_train_epochs=0"],
     "lab train: error: identity-lora.yaml: train.num_train_epochs=0 trains nothing; give a number of passes "
     "over the data above 0 (e.g. 3), or train.max_steps above 0"),
    ("batch-size-zero", lambda t, r: ["train", "--hw", "cpu", "--set", "train.per_device_train_batch_size=0"],
     "lab train: error: identity-lora.yaml: train.per_device_train_batch_size=0: give 1 or more (examples per "
     "device per step)"),
    ("accumulation-zero", lambda t, r: ["train", "--hw", "cpu", "--set", "train.gradient_accumulation_steps=0"],
     "lab train: error: identity-lora.yaml: train.gradient_accumulation_steps=0: give 1 or more (micro-batches "
     "per optimizer step)"),
    ("identity-name-empty", lambda t, r: ["train", "--hw", "cpu", "--set", "identity.name="],
     "lab train: error: identity-lora.yaml: identity.name is empty; give the name the model answers with, e.g. "
     "identity.name=Orion"),
    ("identity-name-blank", lambda t, r: ["train", "--hw", "cpu", "--set", "identity.name='  '"],
     "lab train: error: identity-lora.yaml: identity.name is empty; give the name the model answers with, e.g. "
     "identity.name=Orion"),
    ("identity-author-empty", lambda t, r: ["train", "--hw", "cpu", "--set", "identity.author="],
     "lab train: error: identity-lora.yaml: identity.author is empty; give who the model says made it, e.g. "
     "identity.author='Zhou Lab'"),
    ("set-list-index", lambda t, r: ["train", "--hw", "cpu", "--set", "datasets.5.repeat=2"],
     "lab train: error: override 'datasets.5.repeat': '5' is not an index of a 2-item list"),
    ("trust-remote-code", lambda t, r: ["train", "--hw", "cpu", "--set", "train.trust_remote_code=true"],
     "lab train: error: identity-lora.yaml: train.trust_remote_code runs the model repository's own "
     "Python code; add `allow: [trust_remote_code]` to the recipe if you mean it"),
    ("push-to-hub", lambda t, r: ["train", "--hw", "cpu", "--set", "train.push_to_hub=true"],
     "lab train: error: identity-lora.yaml: train.push_to_hub uploads the model (trained on your data) to "
     "the Hub; add `allow: [push_to_hub]` to the recipe if you mean it"),
    ("report-to-a-list", lambda t, r: ["train", "--hw", "cpu", "--set", "train.report_to=[tensorboard,wandb]"],
     "lab train: error: identity-lora.yaml: train.report_to sends metrics to an outside service; add "
     "`allow: [report_to]` to the recipe if you mean it"),
    ("report-to", lambda t, r: ["train", "--hw", "cpu", "--set", "train.report_to=wandb"],
     "lab train: error: identity-lora.yaml: train.report_to sends metrics to an outside service; add "
     "`allow: [report_to]` to the recipe if you mean it"),
    ("hub-token", lambda t, r: ["train", "--hw", "cpu", "--set", f"train.hub_token={TOKEN}"],
     "lab train: error: identity-lora.yaml: train.hub_token is a credential; recipes are copied into runs "
     "and manifests, so give it through the environment (HF_TOKEN) instead"),
    ("token-elsewhere", lambda t, r: ["train", "--hw", "cpu", "--set", f"chat_template_kwargs.api_key={TOKEN}"],
      "lab train: error: identity-lora.yaml: chat_template_kwargs.api_key is a credential; recipes are "
      "copied into runs and manifests, so give it through the environment (HF_TOKEN) instead"),
    ("lab-owned-key", lambda t, r: ["train", "--hw", "cpu", "--set", "train.output_dir=/tmp/x"],
     "lab train: error: identity-lora.yaml: train.output_dir is set by the lab (use the top-level key or "
     "the CLI instead)"),
    ("model-init-kwargs", lambda t, r: ["train", "--hw", "cpu", "--set", "train.model_init_kwargs={}"],
     "lab train: error: identity-lora.yaml: train.model_init_kwargs is set by the lab (use the top-level "
     "key or the CLI instead)"),
    ("api-key-env-name", lambda t, r: ["train", "--hw", "cpu", "--set", "serve.api_key_env='MY KEY'"],
     "lab train: error: identity-lora.yaml: serve.api_key_env: String should match pattern "
     "'^[A-Za-z_][A-Za-z0-9_]*$'"),
    ("recipe-not-utf8", lambda t, r: ["train", "--recipe", str(_write(t / "r.yaml", b"name: caf\xe9\n"))],
     "lab train: error: {tmp}/r.yaml: not UTF-8 text (byte 0xe9 at offset 9); save it as UTF-8"),
    ("recipe-bad-yaml", lambda t, r: ["train", "--recipe", str(_write(t / "r.yaml", b"name: [unclosed\n"))],
     "lab train: error: {tmp}/r.yaml:2: not valid YAML (expected ',' or ']', but got '<stream end>')"),
    ("recipe-a-list", lambda t, r: ["train", "--recipe", str(_write(t / "r.yaml", b"- name: x\n"))],
     "lab train: error: {tmp}/r.yaml: a recipe is a YAML mapping, got list"),
    ("recipe-hw-overlay", lambda t, r: ["train", "--recipe", recipe_file(t, "hw:\n  tpu: {}\n", [GOOD_ROW])],
     "lab train: error: {tmp}/recipe.yaml: hw overlay for unknown backend(s) ['tpu']; known: cpu, cuda, "
     "rocm"),
    ("recipe-no-datasets", lambda t, r: ["train", "--hw", "cpu", "--recipe",
                                         str(_write(t / "r.yaml", b"name: x\ndatasets: []\n"))],
     "lab train: error: r.yaml: datasets: List should have at least 1 item after validation, not 0"),
    # --- data ---
    ("data-missing", lambda t, r: ["train", "--hw", "cpu", "--recipe", recipe_file(t)],
     "lab train: error: dataset file {tmp}/data.json does not exist (path is relative to "
     "{tmp}/recipe.yaml)"),
    ("data-csv", lambda t, r: ["train", "--hw", "cpu", "--recipe", recipe_file(t, data=b"a,b\n", data_name="d.csv")],
     "lab train: error: {tmp}/d.csv: unknown file type '.csv'; use .json, .jsonl or .parquet"),
    ("data-not-a-list", lambda t, r: ["train", "--hw", "cpu", "--recipe", recipe_file(t, data={"a": 1})],
     "lab train: error: {tmp}/data.json: expected a JSON list of records"),
    ("data-bad-jsonl", lambda t, r: ["train", "--hw", "cpu", "--recipe",
                                     recipe_file(t, data=b'{"instruction": "a", "output": "b"}\n{oops\n',
                                                 data_name="d.jsonl")],
     "lab train: error: {tmp}/d.jsonl:2: bad JSON line (Expecting property name enclosed in double quotes)"),
    ("data-gbk", lambda t, r: ["train", "--hw", "cpu", "--recipe",
                               recipe_file(t, data=json.dumps([{"instruction": "你是谁", "output": "我是"}],
                                                              ensure_ascii=False).encode("gbk"))],
     "lab train: error: {tmp}/data.json: not UTF-8 text (byte 0xc4 at offset 18); convert it, e.g. `iconv "
     "-f GBK -t UTF-8 data.json`"),
    ("data-messages-string", lambda t, r: ["train", "--hw", "cpu", "--recipe",
                                           recipe_file(t, data=[{"messages": "hi there"}])],
     "lab train: error: {tmp}/data.json: row 1: 'messages' must be a list of turns, got str"),
    ("data-sharegpt-pairs", lambda t, r: ["train", "--hw", "cpu", "--recipe",
                                          recipe_file(t, data=[{"conversations": [["human", "hi"], ["gpt", "yo"]]}])],
      "lab train: error: {tmp}/data.json: row 1: each turn of 'conversations' is a mapping with "
      "from/value, got ['human', 'hi']"),
    ("data-template-brace", lambda t, r: ["train", "--hw", "cpu", "--recipe",
                                          recipe_file(t, data=[{"Q": "x", "A": "y"}],
                                                      columns="{instruction: '{Q}}', output: A}")],
     "lab train: error: {tmp}/data.json: row 1: column template '{Q}}' for 'instruction' is not a valid "
     "template (Single '}' encountered in format string); name fields as {Field}, and write a literal "
     "brace as {{ or }}"),
    ("data-template-positional", lambda t, r: ["train", "--hw", "cpu", "--recipe",
                                               recipe_file(t, data=[{"Q": "x", "A": "y"}],
                                                           columns="{instruction: '{0}', output: A}")],
     "lab train: error: {tmp}/data.json: row 1: column template '{0}' for 'instruction' is not a valid "
     "template (Replacement index 0 out of range for positional args tuple); name fields as {Field}, and "
     "write a literal brace as {{ or }}"),
    ("data-template-field", lambda t, r: ["train", "--hw", "cpu", "--recipe",
                                          recipe_file(t, data=[{"Q": "x", "A": "y"}],
                                                      columns="{instruction: '{Question}', output: A}")],
     "lab train: error: {tmp}/data.json: row 1: column template for 'instruction' needs field 'Question', "
     "row has ['A', 'Q']"),
    ("data-placeholder", lambda t, r: ["train", "--hw", "cpu", "--recipe",
                                       recipe_file(t, data=[GOOD_ROW, {"instruction": "Who made you?",
                                                                       "output": "{{nmae}} was made by {{author}}."}])],
      "lab train: error: {tmp}/data.json: row 2: unknown placeholder {{nmae}} in assistant text; the data "
      "may use {{name}} and {{author}}"),
    ("data-ends-with-user", lambda t, r: ["train", "--hw", "cpu", "--recipe",
                                          recipe_file(t, data=[{"messages": [{"role": "user", "content": "hi"}]}])],
     "lab train: error: {tmp}/data.json: row 1: a conversation must end with an assistant turn to train on"),
    ("data-unknown-format", lambda t, r: ["train", "--hw", "cpu", "--recipe",
                                          recipe_file(t, data=[{"question": "x", "answer": "y"}])],
      "lab train: error: {tmp}/data.json: row 1: unknown format with fields ['answer', 'question']; expected "
      "alpaca, messages, sharegpt, prompt/completion or chosen/rejected, or map fields with `columns:`"),
    ("data-raw-text", lambda t, r: ["train", "--hw", "cpu", "--recipe", recipe_file(t, data=[{"text": "x"}])],
      "lab train: error: {tmp}/data.json: row 1: raw text (a `text` field): that is pretraining data, and the lab "
      "trains chat replies; make question/answer rows, or build them from your fields with `columns:`"),
    ("data-empty", lambda t, r: ["train", "--hw", "cpu", "--recipe", recipe_file(t, data=[])],
     "lab train: error: {tmp}/data.json: dataset is empty"),
    ("data-bad-role", lambda t, r: ["train", "--hw", "cpu", "--recipe",
                                    recipe_file(t, data=[{"messages": [{"role": "human", "content": "hi"},
                                                                       {"role": "assistant", "content": "yo"}]}])],
      "lab train: error: {tmp}/data.json: row 1: bad turn {'role': 'human', 'content': 'hi'}: needs a "
      "system/user/assistant/tool role and text content"),
    # --- models ---
    ("model-empty-dir", lambda t, r: ["train", "--hw", "cpu", "--recipe",
                                      recipe_file(t, f"model: {{path: {_model_dir(t, {})}}}\n", [GOOD_ROW])],
     "lab train: error: model directory {tmp}/model has no config.json (it holds nothing); give a Hugging "
     "Face model directory: config.json, tokenizer files, *.safetensors"),
    ("model-a-file", lambda t, r: ["train", "--hw", "cpu", "--recipe",
                                   recipe_file(t, f"model: {{path: {_write(t / 'm.bin', b'x')}}}\n", [GOOD_ROW])],
     "lab train: error: model.path '{tmp}/m.bin' is a file; give a model directory, a .gguf file or a hub id"),
    ("model-gguf-missing", lambda t, r: ["train", "--hw", "cpu", "--set", f"model.path={t}/nope.gguf"],
     "lab train: error: model.path '{tmp}/nope.gguf': no such GGUF file; check the path"),
    ("model-gguf-not-gguf", lambda t, r: ["train", "--hw", "cpu", "--set",
                                          f"model.path={_write(t / 'bad.gguf', b'not a gguf')}"],
     "lab train: error: {tmp}/bad.gguf: not a GGUF model transformers can read ({tmp}/bad.gguf does not start "
     "with the GGUF magic bytes, so it is not a GGUF file.)"),
    ("model-pickle-only", lambda t, r: ["train", "--hw", "cpu", "--recipe",
                                        recipe_file(t, "model: {{path: {}}}\n".format(_model_dir(
                                            t, {"config.json": b"{}", "pytorch_model.bin": b"x"})), [GOOD_ROW])],
      "lab train: error: model {tmp}/model has only pickle weights (pytorch_model.bin), which can run code "
      "when loaded; convert them to safetensors, or set model.allow_pickle=true if you trust the source"),
    ("model-no-weights", lambda t, r: ["train", "--hw", "cpu", "--recipe",
                                       recipe_file(t, "model: {{path: {}}}\n".format(_model_dir(
                                           t, {"config.json": b"{}"})), [GOOD_ROW])],
     "lab train: error: model directory {tmp}/model has no weights (*.safetensors); was the download or "
     "copy complete?"),
    ("model-bad-hub-id", lambda t, r: ["train", "--hw", "cpu", "--recipe",
                                       recipe_file(t, "model: {path: 'not a/valid id!'}\n", [GOOD_ROW])],
     "lab train: error: model.path 'not a/valid id!' is neither a local directory nor a hub id "
     "(org/name); check the path"),
    ("hw-cuda-without-gpu", lambda t, r: ["train", "--hw", "cuda", "--recipe", recipe_file(t, data=[GOOD_ROW])],
      "lab train: error: HW=cuda: no NVIDIA device is visible (/dev/nvidia* missing): on the host, install "
      "the NVIDIA driver (>= 580 for CUDA 13); in a container, the NVIDIA Container Toolkit (`nvidia-ctk "
      "runtime configure --runtime=docker`, then restart Docker) and a GPU request (compose's "
      "deploy.resources, `docker run --gpus all`)"),
    # --- runs ---
    ("run-missing", lambda t, r: ["merge", "--run", "no-such-run"],
     "lab merge: error: run 'no-such-run' not found under {tmp}/runs; start one with `make train`"),
    ("run-untrained", lambda t, r: ["merge", "--run", str(_mkdir(r / "empty"))],
     "lab merge: error: {tmp}/runs/empty/recipe.yaml is missing; `make train` produces it"),
    ("run-recipe-edited", lambda t, r: ["merge", "--run", str(_saved_run(r, "name: x\ndatasets: 3\n"))],
     "lab merge: error: {tmp}/runs/edited/recipe.yaml: not a recipe this lab can read (datasets: Input "
     "should be a valid list); was it edited, or written by another version of the lab?"),
    ("run-dotdot", lambda t, r: ["train", "--hw", "cpu", "--run", ".."],
     "lab train: error: RUN='..' is not a run name; give a name such as my-run (kept under {tmp}/runs) or "
     "a run directory path"),
    ("resume-no-checkpoint", lambda t, r: ["train", "--resume", "--run",
                                           str(_saved_run(r, load_recipe("identity-lora", hw="cpu").to_yaml()))],
     "lab train: error: RESUME=1 but {tmp}/runs/edited/checkpoints holds no complete checkpoint to resume from"),
    ("gpus-zero", lambda t, r: ["train", "--hw", "cpu", "--gpus", "0"],
     "lab train: error: GPUS=0: give a number of processes, 1 or more"),
    ("gpus-not-a-number", lambda t, r: ["train", "--gpus", "two"],
     "lab train: error: argument --gpus: invalid int value: 'two' (see `lab train --help`)"),
    ("nodes-without-main", lambda t, r: ["train", "--hw", "cpu", "--nodes", "2"],
     "lab train: error: NODES=2: MAIN='' must be node 0's address and a free port, as host:port (the same on every "
     "node)"),
    ("node-rank-out-of-range", lambda t, r: ["train", "--hw", "cpu", "--nodes", "2", "--node-rank", "2", "--main",
                                             "10.0.0.1:29500"],
     "lab train: error: NODES=2 NODE_RANK=2: give the number of machines and this one's rank, 0 to 1 (0 on the "
     "machine MAIN names)"),
    ("multi-node-config-without-address", lambda t, r: ["train", "--hw", "cpu", "--dist", str(
        _write(t / "two.yaml", b"distributed_type: MULTI_GPU\nnum_machines: 2\nmachine_rank: 1\n"))],
     "lab train: error: {tmp}/two.yaml: num_machines 2 needs main_process_ip and main_process_port (node 0's address "
     "and a free port)"),
    ("cluster-with-node-rank", lambda t, r: ["train", "--hw", "cpu", "--cluster", "ray://10.0.0.1:10001",
                                             "--node-rank", "1"],
     "lab train: error: CLUSTER=ray://10.0.0.1:10001: Ray places GPUS x NODES workers itself; drop NODE_RANK and "
     "MAIN"),
    ("node-head-not-an-address", lambda t, r: ["node", "--hw", "cpu", "--head", "10.0.0.1"],
     "lab node: error: HEAD='10.0.0.1': give the head's address as host:port (port 6379 unless PORT= moved it)"),
    ("node-head-silent", lambda t, r: ["node", "--hw", "cpu", "--head", f"127.0.0.1:{free_port()}"], None),
    ("node-ray-args-quote", lambda t, r: ["node", "--hw", "cpu", "--ray-args", "--num-cpus 'x"],
     "lab node: error: RAY_ARGS=\"--num-cpus 'x\": No closing quotation"),
    ("dist-unknown", lambda t, r: ["train", "--hw", "cpu", "--gpus", "2", "--dist", "zero9"],
     f"lab train: error: DIST='zero9': no accelerate config {RECIPES_DIR}/accelerate/zero9.yaml; shipped: "
     "ddp, fsdp2, zero3, or a path to your own"),
    ("compare-one-run", lambda t, r: ["compare", "x"],
     "lab compare: error: compare needs two runs: make compare A=runs/<id> B=runs/<id>"),
    ("compare-corrupt-manifest", lambda t, r: ["compare", str(_write(_mkdir(r / "a") / "manifest.json", b"{not json")),
                                               "b"],
     "lab compare: error: {tmp}/runs/a/manifest.json is damaged (Expecting property name enclosed in "
     "double quotes: line 1 column 2 (char 1)); rerun the run, or restore the file"),
    ("reproduce-no-manifest", lambda t, r: ["reproduce", str(_mkdir(r / "bare"))],
     "lab reproduce: error: {tmp}/runs/bare/manifest.json is missing; runs made by `make train` or `make "
     "e2e` write one"),
    # --- servers and clients ---
    ("port-not-a-number", lambda t, r: ["ask", "--hw", "cpu", "--port", "abc", "hi"],
     "lab ask: error: PORT='abc' is not a port number (1-65535)"),
    ("port-out-of-range", lambda t, r: ["ask", "--hw", "cpu", "--port", "70000", "hi"],
     "lab ask: error: PORT='70000' is not a port number (1-65535)"),
    ("base-url-no-scheme", lambda t, r: ["ask", "--hw", "cpu", "--base-url", "localhost:8000", "hi"],
     "lab ask: error: BASE_URL='localhost:8000' is not an http(s) URL; give e.g. http://127.0.0.1:8000"),
    ("base-url-nobody-there", lambda t, r: ["ask", "--hw", "cpu", "--base-url", "http://127.0.0.1:9/v1", "hi"],
     "lab ask: error: no server answers at http://127.0.0.1:9/v1/; start one with `make serve`"),
    ("stop-corrupt-record", lambda t, r: ["stop"] if _write(_mkdir(r / ".servers") / "8000.json", b"{") else [],
     "lab stop: error: {tmp}/runs/.servers/8000.json is damaged (Expecting property name enclosed in double "
     "quotes: line 1 column 2 (char 1)); remove it once no lab server runs (`ps`, `docker ps`)"),
    ("serve-exposed-without-key", lambda t, r: ["serve", "--hw", "cpu", "--model", "base", "--set",
                                                "serve.host=0.0.0.0 serve.require_key=false"],
     "lab serve: error: serve.host=0.0.0.0 listens beyond this machine; serve it with a key "
     "(serve.require_key=true, or LAB_API_KEY=<secret>)"),
    ("adapter-loading-without-adapters", lambda t, r: ["serve", "--hw", "cpu", "--model", "base", "--set",
                                                       "serve.adapter_loading=true"],
     "lab serve: error: serve.adapter_loading=true loads further adapters into a server of adapters: start it "
     "with ADAPTERS=\"RUN ...\""),
    ("serve-on-ray-on-cpu", lambda t, r: ["serve", "--hw", "cpu", "--model", "base", "--cluster",
                                          "ray://10.0.0.1:10001", "--nodes", "2"],
     "lab serve: error: CLUSTER=ray://10.0.0.1:10001 on cpu: vLLM's CPU backend does not run on Ray (vLLM 0.32 "
     "refuses: 'current platform cpu does not support ray'); serve with HW=cuda or HW=rocm, or without CLUSTER="),
    ("serve-nodes-without-cluster", lambda t, r: ["serve", "--hw", "cuda", "--model", "base", "--nodes", "2"],
     "lab serve: error: NODES=2: vLLM spreads a model over machines of a Ray cluster; give CLUSTER= (its address, "
     "e.g. ray://head:10001 or head:6379) and run make serve on one of them"),
    ("adapter-without-server", lambda t, r: ["adapter", "--hw", "cpu"],
     "lab adapter: error: no lab server is running; `make serve ADAPTERS=\"RUN ...\" SET=serve.adapter_loading=true` "
     "starts one that loads adapters"),
    ("key-without-server", lambda t, r: ["key"],
     "lab key: error: no lab server is running; `make serve` starts one"),
    ("probe-questions-bad", lambda t, r: ["probe", "--hw", "cpu", "--base-url", "http://127.0.0.1:9", "--recipe",
                                          recipe_file(t, "probe: {questions: q.yaml}\n"
                                                      if _write(t / "q.yaml", b"identity:\n  - {about: name}\n")
                                                      else "", [GOOD_ROW])],
     'lab probe: error: {tmp}/q.yaml: identity item 1 needs \'q\' (e.g. {q: "Who are you?"})'),
]


def _write(path: Path, content: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content)
    return path


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest.mark.parametrize("case, argv, expected", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_refused_in_one_exact_line(case, argv, expected, tmp_path, runs_dir, capsys, monkeypatch):
    monkeypatch.delenv("LAB_DEBUG", raising=False)
    args = argv(tmp_path, runs_dir)
    try:
        status = main(args)
    except SystemExit as e:  # argparse's own refusals (one line too: lab.cli._Parser)
        status = e.code
    err = capsys.readouterr().err
    line = err.strip().replace(str(tmp_path), "{tmp}").replace(str(runs_dir), "{runs}")
    assert status == 2, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert TOKEN not in err
    if expected is not None:
        assert line == expected
    # nothing half-made is left looking like a run: a failed new run is removed
    if args[0] == "train" and "--resume" not in args and "--run" not in args:
        assert not [d for d in runs_dir.glob("*") if d.name not in (".servers", "index.html")] \
            if runs_dir.exists() else True
