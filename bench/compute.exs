# Compute: SHA-256 of 1 MiB with the same Rust code (bench/kernels) as a
# wasm guest under Capsid and as a plain native NIF, plus pure Elixir.
#
#     mix run bench/compute.exs

Code.require_file("support.exs", __DIR__)
started = Capsid.Bench.Measure.cpu_snapshot()

alias Capsid.Bench.{Baseline, Measure, Report, Sha256}

defmodule Capsid.Bench.Compute do
  @moduledoc false

  alias Capsid.Bench.{Baseline, Sha256}

  def capsid(target, data), do: {:ok, _} = Capsid.call(target, "sha256", [data])
  def nif(data), do: Baseline.sha256(data)
  def elixir(data), do: Sha256.hash(data)
  def crypto(data), do: :crypto.hash(:sha256, data)
end

Baseline.load()
{_component, instance} = Capsid.Bench.Guest.start!()
# The same guest compiled for the guarded engine (no bounds checks).
{_component, guarded} = Capsid.Bench.Guest.start!(guard_pages: true)
# ... and without fuel metering (bounded by its timeout alone).
{_component, unmetered} = Capsid.Bench.Guest.start!(guard_pages: true, fuel_metering: false)
m = Capsid.Bench.Compute

size = 1024 * 1024
data = :crypto.strong_rand_bytes(size)
expected = :crypto.hash(:sha256, data)

# All three must produce OpenSSL's digest before anything is timed.
{:ok, ^expected} = Capsid.call(instance, "sha256", [data])
{:ok, ^expected} = Capsid.call(guarded, "sha256", [data])
{:ok, ^expected} = Capsid.call(unmetered, "sha256", [data])
^expected = Baseline.sha256(data)
^expected = Sha256.hash(data)

for n <- [0, 1, 55, 56, 63, 64, 65, 1000] do
  d = :crypto.strong_rand_bytes(n)
  e = :crypto.hash(:sha256, d)
  {:ok, ^e} = Capsid.call(instance, "sha256", [d])
  {:ok, ^e} = Capsid.call(guarded, "sha256", [d])
  {:ok, ^e} = Capsid.call(unmetered, "sha256", [d])
  ^e = Baseline.sha256(d)
  ^e = Sha256.hash(d)
end

fast = [warmup: 500, samples: 200, max_ms: 4_000, min_samples: 20]
slow = [warmup: 300, samples: 15, max_ms: 4_000, min_samples: 5]

# The Capsid engines and the native NIF are timed in interleaved rounds
# (each round times each of them once), so that the drifts of a shared
# machine hit them all alike: their ratios are what this script is for.
interleaved = [
  {"Capsid guest (wasm, kernels crate)", {m, :capsid, [instance, data]}},
  {"plain Rust NIF (native, kernels crate)", {m, :nif, [data]}},
  {"Capsid guest, guard_pages: true", {m, :capsid, [guarded, data]}},
  {"Capsid guest, guard_pages: true, fuel_metering: false", {m, :capsid, [unmetered, data]}}
]

for _ <- 1..20, {_, mfa} <- interleaved, do: Measure.time(mfa)

rounds =
  for _ <- 1..200 do
    for {_, mfa} <- interleaved, do: elem(Measure.time(mfa), 0)
  end

interleaved_results =
  interleaved
  |> Enum.with_index()
  |> Enum.map(fn {{name, _}, i} -> {name, Measure.stats(Enum.map(rounds, &Enum.at(&1, i)))} end)

others = [
  {"pure Elixir", {m, :elixir, [data]}, slow},
  {":crypto (OpenSSL; reference only: different code, asm)", {m, :crypto, [data]}, fast}
]

results =
  interleaved_results ++
    for {name, mfa, opts} <- others, do: {name, Measure.stats(Measure.sample(mfa, 1, opts))}

Report.header("Compute: SHA-256 of 1 MiB")

IO.puts("""
One call hashes 1 MiB (1,048,576 random bytes). The guest and the NIF
compile the same portable Rust source (`bench/kernels`, no SIMD); all
contenders were checked against `:crypto.hash(:sha256, data)` first (and at
the padding edge sizes 0..1000 bytes). One call per sample; median and p99 over
the samples; the Capsid rows and the NIF are timed in interleaved rounds.
The Capsid guest runs with fuel metering and epoch interruption on (the
default) and yields to the scheduler every ≈ 0.5 ms; the NIF holds its
scheduler for the whole call. `guard_pages: true` compiles the guest
without bounds checks (memories with guard regions); `fuel_metering: false`
without fuel counting (time limits only): see `Capsid.Component.load/2`.
""")

[{_, guest}, {_, native}, {_, guarded_stats}, {_, unmetered_stats} | _] = results

table =
  for {name, s} <- results do
    [
      name,
      Report.f(s.median / 1.0e6, 2),
      Report.f(s.p99 / 1.0e6, 2),
      Report.int(Measure.mb_per_s(size, s.median)),
      Report.ratio(s.median / native.median, 2),
      s.n
    ]
  end

IO.puts(
  Report.table(["contender", "median ms", "p99 ms", "MB/s", "vs native NIF", "samples"], table)
)

IO.puts(
  "Guest / native (median): **#{Report.ratio(guest.median / native.median, 2)}** " <>
    "(#{Report.f(guest.median / 1.0e6, 2)} ms vs #{Report.f(native.median / 1.0e6, 2)} ms).\n"
)

IO.puts(
  "Guest with guard_pages: true / native (median): " <>
    "**#{Report.ratio(guarded_stats.median / native.median, 2)}** " <>
    "(#{Report.f(guarded_stats.median / 1.0e6, 2)} ms); also with fuel_metering: false: " <>
    "**#{Report.ratio(unmetered_stats.median / native.median, 2)}** " <>
    "(#{Report.f(unmetered_stats.median / 1.0e6, 2)} ms).\n"
)

Report.noise(started)
