# The cost of one trivial call: `add(a, b)` through Capsid.call/3, through a
# plain rustler NIF, and as a pure Elixir remote call.
#
#     mix run bench/call_overhead.exs

Code.require_file("support.exs", __DIR__)
started = Capsid.Bench.Measure.cpu_snapshot()

alias Capsid.Bench.{Baseline, Measure, Report}

defmodule Capsid.Bench.CallOverhead.Plain do
  @moduledoc false
  # A remote call to another module: the compiler cannot inline or fold it.
  def add(a, b), do: a + b
end

defmodule Capsid.Bench.CallOverhead do
  @moduledoc false
  # One loop per contender, each doing `n` calls with a varying argument.

  alias Capsid.Bench.Baseline
  alias Capsid.Bench.CallOverhead.Plain

  def capsid(_target, 0), do: :ok

  def capsid(target, n) do
    {:ok, _} = Capsid.call(target, "add", [n, 1])
    capsid(target, n - 1)
  end

  def nif(0), do: :ok

  def nif(n) do
    _ = Baseline.add(n, 1)
    nif(n - 1)
  end

  def elixir(0), do: :ok

  def elixir(n) do
    _ = Plain.add(n, 1)
    elixir(n - 1)
  end

  def empty(0), do: :ok
  def empty(n), do: empty(n - 1)

  # Each call timed on its own (n timings): shows the tail a batch mean hides.
  def single(fun, n), do: single(fun, n, [])
  defp single(_fun, 0, acc), do: acc

  defp single(fun, n, acc) do
    t0 = :erlang.monotonic_time(:nanosecond)
    fun.(n)
    t1 = :erlang.monotonic_time(:nanosecond)
    single(fun, n - 1, [t1 - t0 | acc])
  end

  def one_capsid(target), do: fn n -> {:ok, _} = Capsid.call(target, "add", [n, 1]) end
  def one_nif, do: fn n -> Baseline.add(n, 1) end
  def one_elixir, do: fn n -> Plain.add(n, 1) end
  def one_empty, do: fn n -> n end
end

Baseline.load()
{component, instance} = Capsid.Bench.Guest.start!()
{:ok, 3} = Capsid.call(instance, "add", [1, 2])
3 = Baseline.add(1, 2)

pool =
  if Code.ensure_loaded?(Capsid.Pool) do
    {:ok, pool} = Capsid.Pool.start_link(component: component, size: System.schedulers_online())
    {:ok, 3} = Capsid.call(pool, "add", [1, 2])
    pool
  end

batch = 1_000
opts = [warmup: 500, samples: 400, max_ms: 3_000]
m = Capsid.Bench.CallOverhead

contenders =
  [
    {"Capsid.call (Capsid.Instance)", {m, :capsid, [instance, batch]}, m.one_capsid(instance)},
    pool &&
      {"Capsid.call (Capsid.Pool, size #{System.schedulers_online()})", {m, :capsid, [pool, batch]},
       m.one_capsid(pool)},
    {"plain Rust NIF (baseline)", {m, :nif, [batch]}, m.one_nif()},
    {"pure Elixir remote call", {m, :elixir, [batch]}, m.one_elixir()},
    {"empty loop (loop cost only)", {m, :empty, [batch]}, m.one_empty()}
  ]
  |> Enum.reject(&is_nil/1)

results =
  for {name, mfa, _one} <- contenders do
    {name, Measure.stats(Measure.sample(mfa, batch, opts))}
  end

Report.header("Call overhead: `add(a, b)`")

IO.puts("""
Batches of #{Report.int(batch)} calls, each batch timed with
`:erlang.monotonic_time(:nanosecond)`; per-call time = batch time / #{batch}.
Median and p99 are over the batches (#{opts[:samples]} batches or
#{opts[:max_ms]} ms per row, after #{opts[:warmup]} ms of warm-up), so p99 is
the 99th-percentile *batch mean*, not the slowest single call (see the second
table). calls/s = 10⁹ / median. Loops are compiled module functions.
""")

nif_median =
  results |> List.keyfind("plain Rust NIF (baseline)", 0) |> elem(1) |> Map.fetch!(:median)

rows =
  for {name, s} <- results do
    [
      name,
      Report.f(s.median, 1),
      Report.f(s.p99, 1),
      Report.int(s.per_s),
      Report.ratio(s.median / nif_median),
      s.n
    ]
  end

IO.puts(
  Report.table(
    ["contender", "median ns/call", "p99 ns/call", "calls/s", "vs NIF", "batches"],
    rows
  )
)

[{_, capsid} | _] = results

IO.puts(
  "Capsid.call / plain NIF (median): **#{Report.ratio(capsid.median / nif_median)}**; " <>
    "Capsid.call median: **#{Report.f(capsid.median, 0)} ns**.\n"
)

# Single-call distribution: every call timed alone. The two clock reads
# are included; the "empty" row is that floor.
single_n = 100_000

single_rows =
  for {name, _mfa, one} <- contenders do
    _ = m.single(one, 10_000)
    ns = m.single(one, single_n)

    [
      name,
      Report.int(Measure.percentile(ns, 50)),
      Report.int(Measure.percentile(ns, 99)),
      Report.int(Measure.percentile(ns, 99.9)),
      Report.int(Enum.max(ns))
    ]
  end

IO.puts("""
Single calls, each timed alone (#{Report.int(single_n)} calls per row; the
timing includes two clock reads and a fun call, which is what the "empty" row
measures):
""")

IO.puts(Report.table(["contender", "p50 ns", "p99 ns", "p99.9 ns", "max ns"], single_rows))

Report.noise(started)
