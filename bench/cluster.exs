# Many nodes (issue 14): the overhead of a remote Capsid call against a
# plain :erpc.call to the same peer, measured in the same run, and the
# duration of cluster-wide deploys and upgrades.
#
#     mix run bench/cluster.exs
#
# The script makes this node distributed (starting epmd if needed) and
# starts two peers on 127.0.0.1 with OTP's :peer: all three share the
# machine's cores, so a round trip here includes the scheduling of two OS
# processes, not a network.

Code.require_file("support.exs", __DIR__)
started = Capsid.Bench.Measure.cpu_snapshot()

alias Capsid.Bench.{Measure, Report}

defmodule Capsid.Bench.Cluster do
  @moduledoc false

  def erpc_plus(_node, 0), do: :ok

  def erpc_plus(node, n) do
    3 = :erpc.call(node, :erlang, :+, [1, 2])
    erpc_plus(node, n - 1)
  end

  def erpc_capsid(_node, _name, 0), do: :ok

  def erpc_capsid(node, name, n) do
    {:ok, 3} = :erpc.call(node, Capsid, :call, [name, "add", [1, 2]])
    erpc_capsid(node, name, n - 1)
  end

  def capsid(_target, 0), do: :ok

  def capsid(target, n) do
    {:ok, 3} = Capsid.call(target, "add", [1, 2])
    capsid(target, n - 1)
  end

  def capsid_timeout(_target, 0), do: :ok

  def capsid_timeout(target, n) do
    {:ok, 3} = Capsid.call(target, "add", [1, 2], timeout: 1_000)
    capsid_timeout(target, n - 1)
  end

  def peer! do
    name = :"bench_peer_#{System.unique_integer([:positive])}"

    {:ok, _peer, node} =
      :peer.start_link(%{name: name, host: ~c"127.0.0.1", longnames: true, wait_boot: 60_000})

    :ok = :erpc.call(node, :code, :add_paths, [:code.get_path()])

    for {k, v} <- Application.get_all_env(:capsid),
        do: :erpc.call(node, Application, :put_env, [:capsid, k, v])

    :ok = :erpc.call(node, Application, :put_env, [:logger, :level, :warning])
    {:ok, _} = :erpc.call(node, Application, :ensure_all_started, [:capsid], 60_000)
    node
  end
end

alias Capsid.Bench.Cluster

unless Node.alive?() do
  {_, 0} = System.cmd(System.find_executable("epmd"), ["-daemon"])
  {:ok, _} = :net_kernel.start(:"capsid_bench@127.0.0.1", %{name_domain: :longnames})
end

Report.header("Many nodes: remote calls and cluster-wide deploys")

bench = Capsid.Guests.path(:bench)
[p1, p2] = for _ <- 1..2, do: Cluster.peer!()

# Deploys: the first loads on both peers (compiled, or from the disk cache),
# the second is the same bytes on a node more (the peers keep theirs).
{:ok, first} = Capsid.deploy(:bench_remote, bench, nodes: [p1], size: 1)
{:ok, again} = Capsid.deploy(:bench_remote, bench, nodes: [p1, p2], size: 1)

# Upgrades: alternate two versions so that each is a real swap on both
# peers (force: the greeter versions are compatible, this measures the swap).
v1 = Capsid.Guests.path(:greeter_v1)
v2 = Capsid.Guests.path(:greeter_v2)
{:ok, greeter} = Capsid.deploy(:bench_greeter, v1, nodes: [p1, p2], size: 1)

swaps =
  for i <- 1..20 do
    {:ok, info} = Capsid.deploy(:bench_greeter, if(rem(i, 2) == 1, do: v2, else: v1))
    info.duration_us * 1_000
  end

rollbacks =
  for _ <- 1..10 do
    {:ok, info} = Capsid.rollback(:bench_greeter)
    info.duration_us * 1_000
  end

# Calls. The target instance lives on p1 only (a deployment of size 1 on
# one node), so every remote Capsid call and every :erpc goes to p1.
:ok = Capsid.undeploy(:bench_remote)
{:ok, _} = Capsid.deploy(:bench_remote, bench, nodes: [p1], size: 1)

[member] =
  :erpc.call(p1, Capsid.Pool, :members, [
    :sys.get_state(:erpc.call(p1, Capsid.Deployment, :whereis, [:bench_remote])).current.pool.pid
  ])

{:ok, local} = Capsid.Instance.start_link(component: Capsid.Component.load!(bench))

per = 200
opts = [samples: 30, max_ms: 2_000, warmup: 200]

rows = [
  {"`:erpc.call(p1, :erlang, :+, [1, 2])` (floor)", {Cluster, :erpc_plus, [p1, per]}},
  {"`:erpc.call(p1, Capsid, :call, [name, \"add\", [1, 2]])`",
   {Cluster, :erpc_capsid, [p1, :bench_remote, per]}},
  {"`Capsid.call(name, \"add\", [1, 2])`, name held by p1 only",
   {Cluster, :capsid, [:bench_remote, per]}},
  {"the same with `timeout: 1_000`", {Cluster, :capsid_timeout, [:bench_remote, per]}},
  {"`Capsid.call(pid_on_p1, \"add\", [1, 2])`", {Cluster, :capsid, [member, per]}},
  {"`Capsid.call(local_pid, \"add\", [1, 2])` (for scale)", {Cluster, :capsid, [local, per * 10]}}
]

# Three rounds, the rows interleaved, so that a noisy moment of the shared
# machine does not land on one row only; each ratio is against the floor of
# its own round.
rounds =
  for _ <- 1..3 do
    for {_label, mfa} <- rows,
        do: Measure.sample(mfa, elem(mfa, 2) |> List.last(), opts) |> Measure.median()
  end

IO.puts(
  Report.table(
    ["operation", "median per call (3 rounds)", "× the :erpc floor, per round"],
    rows
    |> Enum.with_index()
    |> Enum.map(fn {{label, _}, i} ->
      per_round = Enum.map(rounds, &Enum.at(&1, i))
      ratios = Enum.map(rounds, &(Enum.at(&1, i) / hd(&1)))

      [
        label,
        Report.dur(Measure.median(per_round)),
        Enum.map_join(ratios, ", ", &Report.ratio(&1, 2))
      ]
    end),
    [:left, :right, :right]
  )
)

deploys = [
  [
    "first deploy on 1 peer (`loaded: #{inspect(Map.values(first.loaded))}`)",
    Report.dur(first.duration_us * 1_000),
    "1"
  ],
  [
    "the same bytes on 2 peers (`loaded: #{inspect(Map.values(again.loaded))}`)",
    Report.dur(again.duration_us * 1_000),
    "1"
  ],
  [
    "another component on 2 peers (`loaded: #{inspect(Map.values(greeter.loaded))}`)",
    Report.dur(greeter.duration_us * 1_000),
    "1"
  ],
  [
    "upgrade on 2 peers (greeter v1 ↔ v2, state handed over)",
    Report.dur(Measure.median(swaps)),
    "#{length(swaps)}"
  ],
  ["rollback on 2 peers", Report.dur(Measure.median(rollbacks)), "#{length(rollbacks)}"]
]

IO.puts("Deploys (`info.duration_us`, from the call to `Capsid.deploy/3` to its return):\n")
IO.puts(Report.table(["what", "median", "runs"], deploys, [:left, :right, :right]))

Report.noise(started)
