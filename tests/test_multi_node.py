"""Two machines for real: two Linux network namespaces joined by a veth pair, each with its own
address, each running the shipped multi-node launch (`accelerate launch --config_file
accelerate_configs/multi_node.yaml --machine_rank R --main_process_ip <node 0>`), one process per
node, gloo over TCP. Nothing in the tests sets GLOO_SOCKET_IFNAME: hftune picks the interface that
reaches node 0 (here the host name resolves to 127.0.0.1, as in many containers). Slow tier; skipped
where the machine cannot make namespaces (not root, no `ip`)."""

import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import pytest

from conftest import REPO, RANK_PROBE, logged_losses, read_json, run_engine
from test_question_answering import qa_args, rows, write_jsonl

pytestmark = pytest.mark.slow


def _ip(*args):
    subprocess.run(["ip", *args], check=True, capture_output=True)


@pytest.fixture(scope="module")
def two_hosts():
    """(namespace, address) of node 0 and node 1 on a private /24; deleted afterwards."""
    if os.geteuid() != 0 or shutil.which("ip") is None:
        pytest.skip("network namespaces need root and iproute2's `ip`")
    tag, subnet = os.getpid() % 100000, random.randint(100, 250)
    hosts = [(f"hft{tag}n{i}", f"10.{subnet}.{tag % 250}.{i + 1}") for i in range(2)]
    links = [f"veth{tag}n{i}" for i in range(2)]
    try:
        for namespace, _ in hosts:
            _ip("netns", "add", namespace)
        _ip("link", "add", links[0], "type", "veth", "peer", "name", links[1])
        for (namespace, address), link in zip(hosts, links):
            _ip("link", "set", link, "netns", namespace)
            _ip("-n", namespace, "addr", "add", f"{address}/24", "dev", link)
            _ip("-n", namespace, "link", "set", link, "up")
            _ip("-n", namespace, "link", "set", "lo", "up")
    except subprocess.CalledProcessError as err:
        pytest.skip(f"cannot make network namespaces here: {err.stderr.decode().strip()}")
    yield hosts
    for namespace, _ in hosts:
        kill_namespace(namespace)
        subprocess.run(["ip", "netns", "delete", namespace], capture_output=True)


def kill_namespace(namespace):
    pids = subprocess.run(["ip", "netns", "pids", namespace], capture_output=True, text=True).stdout.split()
    for pid in map(int, pids):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def launch_nodes(hosts, args, *, config="multi_node.yaml", script=RANK_PROBE, probe_dir=None, timeout=600,
                 launch_flags=(), node_env=({}, {}), node_args=((), ()), check=True, processes=2):
    """Both nodes' launch commands, run together until both end (or one fails: the other is then stopped
    at once, as it would wait). Returns [(exit status, output, seconds to exit)] per node."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("GLOO_SOCKET_IFNAME", None)
    if probe_dir is not None:
        os.makedirs(probe_dir, exist_ok=True)
        env["HFTUNE_PROBE_DIR"] = str(probe_dir)
    port = str(random.randint(20000, 40000))
    nodes, start = [], time.monotonic()
    for rank, (namespace, _) in enumerate(hosts):
        command = ["ip", "netns", "exec", namespace, sys.executable, "-m", "accelerate.commands.launch",
                   "--config_file", os.path.join(REPO, "accelerate_configs", config), "--num_machines", "2",
                   "--num_processes", str(processes), "--machine_rank", str(rank), "--main_process_ip", hosts[0][1],
                   "--main_process_port", port, *launch_flags, os.path.join(REPO, script), *map(str, args),
                   *node_args[rank]]
        log = tempfile.TemporaryFile("w+")
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env={**env, **node_env[rank]},
                                   cwd=REPO)
        nodes.append([process, log, None])
    while any(ended is None for _, _, ended in nodes) and time.monotonic() - start < timeout:
        for node in nodes:
            if node[2] is None and node[0].poll() is not None:
                node[2] = time.monotonic() - start
        if check and any(process.returncode not in (None, 0) for process, _, _ in nodes):
            break  # one node failed: the other would wait for it
        time.sleep(0.2)
    for namespace, _ in hosts:  # whatever is left: the launchers and their workers (in sessions of their own)
        kill_namespace(namespace)
    results = []
    for process, log, ended in nodes:
        process.wait()
        log.seek(0)
        results.append((process.returncode, log.read(), ended))
    if check:
        for code, output, _ in results:
            assert code == 0, "\n".join(o[-3000:] for _, o, _ in results)
    return results


def test_two_nodes_shard_the_data_and_equal_one_process(two_hosts, tiny_bert, tmp_path):
    """DDP across the two hosts: each rank sees world size 2 and its own half of every batch; the losses
    and weights equal one process with the same global batch; the shared output_dir is written once, and
    the data set is prepared once into the datasets cache both nodes share (the other node reads it)."""
    import json

    from test_sft import trained_weights

    train = write_jsonl(tmp_path / "train.jsonl", rows(24))
    sgd = dict(optim="sgd", learning_rate=0.5)
    shared_cache = {"HF_DATASETS_CACHE": str(tmp_path / "datasets-cache")}
    results = launch_nodes(two_hosts, qa_args(tiny_bert, train, tmp_path / "two", per_device_train_batch_size=4,
                                              **sgd), probe_dir=tmp_path / "probe", node_env=(shared_cache,) * 2)
    assert all("sockets on veth" in output for _, output, _ in results)  # each node found its interface
    assert "shared by every node; the run's main process prepares the data" in results[0][1]
    assert [("Generating train split" in output) for _, output, _ in results] == [True, False]
    probes = {int(p.stem[4:]): json.loads(p.read_text()) for p in (tmp_path / "probe").glob("rank*.json")}
    assert sorted(probes) == [0, 1] and all(probes[r]["world_size"] == 2 for r in (0, 1))
    shards = [set(probes[r]["rows"]) for r in (0, 1)]
    assert shards[0] and not shards[0] & shards[1]
    run_engine(qa_args(tiny_bert, train, tmp_path / "one", **sgd))
    assert logged_losses(tmp_path / "two") == pytest.approx(logged_losses(tmp_path / "one"), abs=1e-4)
    two, one = trained_weights(tmp_path / "two"), trained_weights(tmp_path / "one")
    assert max((two[k] - one[k]).abs().max().item() for k in one) < 1e-4
    assert read_json(tmp_path / "two" / "all_results.json")["train_loss"] > 0


def test_zero3_across_two_nodes_equals_one_process(two_hosts, tiny_bert, tmp_path):
    """ZeRO-3 with DeepSpeed's multi-node launch through torchrun (`--deepspeed_multinode_launcher
    standard`: no pdsh or hostfile): each node holds half the parameters, the losses equal one process."""
    import json

    train = write_jsonl(tmp_path / "train.jsonl", rows(24))
    sgd = dict(optim="sgd", learning_rate=0.5)
    launch_nodes(two_hosts, qa_args(tiny_bert, train, tmp_path / "two", per_device_train_batch_size=4, **sgd),
                 config="deepspeed_zero3.yaml", probe_dir=tmp_path / "probe",
                 launch_flags=("--deepspeed_multinode_launcher", "standard"))
    probes = {int(p.stem[4:]): json.loads(p.read_text()) for p in (tmp_path / "probe").glob("rank*.json")}
    assert all(probes[r]["ds_tensor"] == pytest.approx(probes[r]["ds_numel"] / 2, rel=1e-3) for r in (0, 1))
    run_engine(qa_args(tiny_bert, train, tmp_path / "one", **sgd))
    assert logged_losses(tmp_path / "two") == pytest.approx(logged_losses(tmp_path / "one"), abs=1e-4)


def test_a_dead_node_ends_the_run_in_one_line_and_both_resume_exactly(two_hosts, tiny_bert, tmp_path):
    """Node 1's training process is killed (-9) at step 7, after checkpoint-4 is complete: node 0 ends
    within seconds with one line saying what to do (not a hang); rerunning both commands with
    resume_from_checkpoint: auto continues from checkpoint-4 (its 16 rows skipped, in order) to the
    weights of an uninterrupted run (one process, the same global batches)."""
    from test_sft import trained_weights

    train = write_jsonl(tmp_path / "train.jsonl", rows(32))
    run = qa_args(tiny_bert, train, tmp_path / "two", per_device_train_batch_size=4, max_steps=10,
                  save_strategy="steps", save_steps=4, optim="sgd", learning_rate=0.5, resume_from_checkpoint="auto",
                  dataloader_drop_last="true")  # (DDP's sampler would pad a short last batch with repeated rows)
    (code0, output0, ended0), (code1, _, ended1) = launch_nodes(
        two_hosts, run, script="tests/kill_probe.py", node_env=({}, {"HFTUNE_KILL_AT": "step:7"}), check=False)
    assert code0 != 0 and code1 != 0 and ended0 - ended1 < 60, (ended0, ended1)
    errors = [line for line in output0.splitlines() if line.startswith("hftune: error:")]
    assert len(errors) == 1 and "another process of the run stopped (10." in errors[0], output0[-3000:]
    assert "resume_from_checkpoint: auto" in errors[0]
    assert sorted(p.name for p in (tmp_path / "two").glob("checkpoint-*")) == ["checkpoint-4"]
    launch_nodes(two_hosts, run, script="tests/kill_probe.py")
    run_engine(qa_args(tiny_bert, train, tmp_path / "one", max_steps=10, optim="sgd", learning_rate=0.5,
                       dataloader_drop_last="true"))
    two, one = trained_weights(tmp_path / "two"), trained_weights(tmp_path / "one")
    assert max((two[k] - one[k]).abs().max().item() for k in one) < 1e-4


def test_two_processes_on_each_of_two_nodes_equal_one_process(two_hosts, tiny_bert, tmp_path):
    """2 x 2: four ranks over two hosts, each with its own quarter of every batch; losses and weights
    equal one process with the same global batch."""
    import json

    from test_sft import trained_weights

    train = write_jsonl(tmp_path / "train.jsonl", rows(24))
    sgd = dict(optim="sgd", learning_rate=0.5, max_steps=3)
    launch_nodes(two_hosts, qa_args(tiny_bert, train, tmp_path / "four", per_device_train_batch_size=2, **sgd),
                 probe_dir=tmp_path / "probe", processes=4)
    probes = {int(p.stem[4:]): json.loads(p.read_text()) for p in (tmp_path / "probe").glob("rank*.json")}
    assert sorted(probes) == [0, 1, 2, 3] and all(p["world_size"] == 4 for p in probes.values())
    shards = [set(probes[r]["rows"]) for r in range(4)]
    assert all(shards) and sum(map(len, shards)) == len(set().union(*shards))  # disjoint
    run_engine(qa_args(tiny_bert, train, tmp_path / "one", **sgd))
    assert logged_losses(tmp_path / "four") == pytest.approx(logged_losses(tmp_path / "one"), abs=1e-4)
    four, one = trained_weights(tmp_path / "four"), trained_weights(tmp_path / "one")
    assert max((four[k] - one[k]).abs().max().item() for k in one) < 1e-4


def test_one_output_dir_per_node_resumes_from_the_step_every_node_holds(two_hosts, tiny_bert, tmp_path):
    """Disks not shared (one output_dir per node): refused without save_on_each_node, and for FSDP (which
    cannot save on each node) with it. With it, both nodes
    save checkpoint-4 and -8 and node 1 is killed at step 11; node 1's disk then loses checkpoint-8 (a
    replaced disk): the rerun resumes both nodes from checkpoint-4, the newest step both hold, and ends
    at an uninterrupted run's weights, saved on each node."""
    import shutil as files

    from test_sft import trained_weights

    train = write_jsonl(tmp_path / "train.jsonl", rows(32))
    own_dirs = tuple((f"--output_dir={tmp_path / f'node{rank}'}",) for rank in (0, 1))
    run = qa_args(tiny_bert, train, tmp_path / "unused", per_device_train_batch_size=4, max_steps=12,
                  save_strategy="steps", save_steps=4, optim="sgd", learning_rate=0.5, resume_from_checkpoint="auto",
                  dataloader_drop_last="true")
    for code, output, _ in launch_nodes(two_hosts, run, script="hftune/run.py", node_args=own_dirs, check=False):
        assert code != 0 and "is not shared by the 2 nodes (each sees only its own files): set save_on_each_node" \
            in output, output[-3000:]
    run += ["--save_on_each_node=true"]
    fsdp = launch_nodes(two_hosts, run, config="fsdp.yaml", script="hftune/run.py", node_args=own_dirs, check=False)
    for code, output, _ in fsdp:  # FSDP runs engine: accelerate, which does not save on each node
        assert code != 0 and "(save_on_each_node), not accelerate: use a disk the nodes share." in output, output[-3000:]
    own_caches = tuple({"HF_DATASETS_CACHE": str(tmp_path / f"cache{rank}")} for rank in (0, 1))
    killed = launch_nodes(two_hosts, run, script="tests/kill_probe.py", node_args=own_dirs, check=False,
                          node_env=(own_caches[0], {**own_caches[1], "HFTUNE_KILL_AT": "step:11"}))
    assert "one per node; each node's main process prepares its own" in killed[0][1]
    assert all("Generating train split" in output for _, output, _ in killed)  # each node its own cache
    for node in ("node0", "node1"):  # every node holds a whole checkpoint, model included
        assert (tmp_path / node / "checkpoint-8" / "model.safetensors").is_file()
    files.rmtree(tmp_path / "node1" / "checkpoint-8")
    logs = launch_nodes(two_hosts, run, script="tests/kill_probe.py", node_args=own_dirs, timeout=180)
    assert all(f"resuming from {tmp_path / f'node{r}' / 'checkpoint-4'}" in logs[r][1] for r in (0, 1))
    run_engine(qa_args(tiny_bert, train, tmp_path / "one", max_steps=12, optim="sgd", learning_rate=0.5,
                       dataloader_drop_last="true"))
    one = trained_weights(tmp_path / "one")
    for node in ("node0", "node1"):
        saved = trained_weights(tmp_path / node)
        assert max((saved[k] - one[k]).abs().max().item() for k in one) < 1e-4


def test_hftune_launch_checks_the_main_address_before_waiting_on_it(two_hosts, tmp_path):
    """`hftune launch`: node 0 given another machine's address is refused at once; node 1 with nobody
    listening at node 0 stops after HFTUNE_PREFLIGHT_TIMEOUT seconds, each with one line."""
    def hftune_launch(rank, ip, timeout):
        command = ["ip", "netns", "exec", two_hosts[rank][0], sys.executable, "-m", "hftune", "launch",
                   "--config_file", os.path.join(REPO, "accelerate_configs", "multi_node.yaml"), "--num_machines", "2",
                   "--machine_rank", str(rank), "--main_process_ip", ip, "--main_process_port", "29999",
                   "--config", "text_classification"]
        start = time.monotonic()
        result = subprocess.run(command, capture_output=True, text=True, cwd=REPO, timeout=120,
                                env={**os.environ, "HFTUNE_PREFLIGHT_TIMEOUT": str(timeout)})
        return result, time.monotonic() - start

    result, startup = hftune_launch(0, two_hosts[1][1], 60)  # refused at once: the time to start hftune
    assert result.returncode == 2 and result.stderr.strip().splitlines() == [
        f"hftune: error: machine_rank 0 runs the main process, but main_process_ip {two_hosts[1][1]} is not an "
        f"address of this machine ({two_hosts[0][1]}, 127.0.0.1); give node 0's own address, or this node its own "
        "machine_rank."]
    result, seconds = hftune_launch(1, two_hosts[0][1], 3)
    assert result.returncode == 2 and seconds - startup < 15, (seconds, startup)
    assert result.stderr.strip().splitlines() == [
        f"hftune: error: node 0 at main_process_ip {two_hosts[0][1]}, port 29999, did not answer within 3 s "
        "(Connection refused): start machine_rank 0, check the address and that the port is open between the "
        "machines (HFTUNE_PREFLIGHT_TIMEOUT sets the wait)."]


def test_fsdp_across_two_nodes_equals_one_process(two_hosts, tiny_bert, tweets_csv, tmp_path):
    """FSDP (hftune's FSDP2 over gloo) across the two hosts: each node holds half of every parameter,
    the losses equal one process, and the model is saved once, whole."""
    import json

    from transformers import AutoModelForSequenceClassification

    from test_fsdp import bert_args

    sgd = dict(optim="sgd", learning_rate=0.5, max_steps=4)  # SGD: Adam magnifies all-reduce rounding
    launch_nodes(two_hosts, bert_args(tiny_bert, tweets_csv, output_dir=tmp_path / "two", per_device_train_batch_size=4,
                                      **sgd), config="fsdp.yaml", probe_dir=tmp_path / "probe")
    probes = {int(p.stem[4:]): json.loads(p.read_text()) for p in (tmp_path / "probe").glob("rank*.json")}
    full = probes[0]["full_numel"]
    assert all(probes[r]["local_numel"] == pytest.approx(full / 2, rel=0.01) for r in (0, 1))
    run_engine(bert_args(tiny_bert, tweets_csv, output_dir=tmp_path / "one", per_device_train_batch_size=8, **sgd))
    assert logged_losses(tmp_path / "two") == pytest.approx(logged_losses(tmp_path / "one"), abs=1e-4)
    assert len(logged_losses(tmp_path / "two")) == 4
    AutoModelForSequenceClassification.from_pretrained(tmp_path / "two")
