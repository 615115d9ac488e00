# Parallel throughput: total calls/s of `sha256` of 16 KiB with 1, 2, 4 and
# 16 concurrent caller processes on a Capsid.Pool of System.schedulers_online()
# members; the same load on one Capsid.Instance and on the plain Rust NIF
# for comparison.
#
#     mix run bench/scaling.exs

Code.require_file("support.exs", __DIR__)
started = Capsid.Bench.Measure.cpu_snapshot()

alias Capsid.Bench.{Baseline, Measure, Report}

defmodule Capsid.Bench.Scaling do
  @moduledoc false

  alias Capsid.Bench.Baseline

  def capsid(target, data), do: {:ok, _} = Capsid.call(target, "sha256", [data])
  def nif(_target, data), do: Baseline.sha256(data)

  @doc """
  Runs `callers` processes, each calling `fun(target, data)` back to back
  for `ms` milliseconds. Returns `{calls, elapsed_ns}`.
  """
  def run(fun, target, data, callers, ms) do
    parent = self()
    pids = for _ <- 1..callers, do: spawn_link(fn -> caller(parent, fun, target, data) end)

    # Everyone starts together, at a deadline a little in the future.
    start = :erlang.monotonic_time(:nanosecond) + 5_000_000
    deadline = start + ms * 1_000_000
    for pid <- pids, do: send(pid, {:go, start, deadline})

    results = for pid <- pids, do: receive(do: ({:done, ^pid, n, ended} -> {n, ended}))
    calls = results |> Enum.map(&elem(&1, 0)) |> Enum.sum()
    ended = results |> Enum.map(&elem(&1, 1)) |> Enum.max()
    {calls, ended - start}
  end

  defp caller(parent, fun, target, data) do
    receive do
      {:go, start, deadline} ->
        wait_until(start)
        n = loop(fun, target, data, deadline, 0)
        send(parent, {:done, self(), n, :erlang.monotonic_time(:nanosecond)})
    end
  end

  defp wait_until(t) do
    if :erlang.monotonic_time(:nanosecond) < t, do: wait_until(t), else: :ok
  end

  defp loop(fun, target, data, deadline, n) do
    if :erlang.monotonic_time(:nanosecond) < deadline do
      fun.(target, data)
      loop(fun, target, data, deadline, n + 1)
    else
      n
    end
  end
end

alias Capsid.Bench.Scaling

Baseline.load()
{component, instance} = Capsid.Bench.Guest.start!()
size = System.schedulers_online()
{:ok, pool} = Capsid.Pool.start_link(component: component, size: size)

data = :crypto.strong_rand_bytes(16 * 1024)
expected = :crypto.hash(:sha256, data)
{:ok, ^expected} = Capsid.call(pool, "sha256", [data])
{:ok, ^expected} = Capsid.call(instance, "sha256", [data])
^expected = Baseline.sha256(data)

levels = [1, 2, 4, 16]
duration_ms = 2_000
rounds = 3

contenders = [
  {"Capsid.Pool (size #{size})", &Scaling.capsid/2, pool},
  {"one Capsid.Instance", &Scaling.capsid/2, instance},
  {"plain Rust NIF", &Scaling.nif/2, nil}
]

# Warm-up: every contender at every level, briefly.
for {_, fun, target} <- contenders, level <- levels do
  Scaling.run(fun, target, data, level, 200)
end

# Rounds interleave levels and contenders, so slow drift in the machine's
# load hits all of them alike; each cell reports the median round.
samples =
  for round <- 1..rounds, level <- levels, {name, fun, target} <- contenders, reduce: %{} do
    acc ->
      before = Measure.cpu_snapshot()
      {calls, ns} = Scaling.run(fun, target, data, level, duration_ms)
      other = Measure.other_load(before, Measure.cpu_snapshot())
      _ = round

      Map.update(
        acc,
        {name, level},
        [{calls / ns * 1.0e9, other}],
        &[{calls / ns * 1.0e9, other} | &1]
      )
  end

Report.header("Parallel throughput: sha256 of 16 KiB")

IO.puts("""
N caller processes call back to back for #{duration_ms} ms; calls/s is the
total over all callers divided by the wall time. #{rounds} rounds, levels and
contenders interleaved; each cell is the median round (min–max in the last
column). The pool has #{size} members (= schedulers online); one
Capsid.Instance runs one call at a time (callers queue); the plain NIF has no
lock at all, so it shows what this machine's #{size} schedulers can do.
"Other load" is the CPU that other OS processes (and hypervisor steal) used
during each round, in cores, from /proc/stat minus this VM's own CPU time:
on a #{size}-core machine, anything near 1 means a caller had no core to
run on and the round says little about Capsid.
""")

rows =
  for {name, _, _} <- contenders, level <- levels do
    per_s = Enum.map(samples[{name, level}], &elem(&1, 0))
    base = Measure.median(Enum.map(samples[{name, 1}], &elem(&1, 0)))
    med = Measure.median(per_s)
    others = for {_, o} <- samples[{name, level}], is_number(o), do: o

    [
      name,
      level,
      Report.int(med),
      Report.ratio(med / base, 2),
      "#{Report.int(Enum.min(per_s))}–#{Report.int(Enum.max(per_s))}",
      if(others == [],
        do: "n/a",
        else: Enum.map_join(Enum.reverse(others), " / ", &Report.f(&1, 2))
      )
    ]
  end

IO.puts(
  Report.table(
    [
      "target",
      "callers",
      "calls/s (median)",
      "vs 1 caller",
      "range over rounds",
      "other load (cores), per round"
    ],
    rows,
    [:left, :right, :right, :right, :right, :right]
  )
)

pool_name = "Capsid.Pool (size #{size})"

rate = fn key -> samples[key] |> Enum.map(&elem(&1, 0)) |> Measure.median() end

IO.puts(
  "Pool, 2 callers vs 1: **#{Report.ratio(rate.({pool_name, 2}) / rate.({pool_name, 1}), 2)}** " <>
    "(plain NIF, same run: #{Report.ratio(rate.({"plain Rust NIF", 2}) / rate.({"plain Rust NIF", 1}), 2)}).\n"
)

Report.noise(started)
