# Moving data: echo of a binary (`list<u8>`) and of a string through the
# bench guest, and a copying echo in a plain Rust NIF, at 1 KiB, 64 KiB and
# 1 MiB.
#
#     mix run bench/data.exs

Code.require_file("support.exs", __DIR__)
started = Capsid.Bench.Measure.cpu_snapshot()

alias Capsid.Bench.{Baseline, Measure, Report}

defmodule Capsid.Bench.Data do
  @moduledoc false

  alias Capsid.Bench.Baseline

  def capsid(_target, _fun, _data, 0), do: :ok

  def capsid(target, fun, data, n) do
    {:ok, out} = Capsid.call(target, fun, [data])
    # Cheap proof the payload came back whole (no content compare in the loop).
    true = byte_size(out) == byte_size(data)
    capsid(target, fun, data, n - 1)
  end

  def nif(_data, 0), do: :ok

  def nif(data, n) do
    out = Baseline.echo(data)
    true = byte_size(out) == byte_size(data)
    nif(data, n - 1)
  end
end

Baseline.load()
{_component, instance} = Capsid.Bench.Guest.start!()
m = Capsid.Bench.Data

sizes = [{"1 KiB", 1024}, {"64 KiB", 64 * 1024}, {"1 MiB", 1024 * 1024}]

# Batches long enough (≥ ~100 µs) that the clock's cost is negligible.
batch_for = fn
  1024 -> 200
  65_536 -> 10
  1_048_576 -> 1
end

opts = [warmup: 300, samples: 300, max_ms: 2_000, min_samples: 20]

results =
  for {label, size} <- sizes do
    bytes = :crypto.strong_rand_bytes(size)
    # Valid UTF-8 (ASCII) of the same size for the string echo.
    string = :binary.copy("capsid-b", div(size, 8))

    # Correctness before timing: exact round trips.
    {:ok, ^bytes} = Capsid.call(instance, "echo-bytes", [bytes])
    {:ok, ^string} = Capsid.call(instance, "echo-string", [string])
    ^bytes = Baseline.echo(bytes)

    batch = batch_for.(size)

    for {name, mfa} <- [
          {"Capsid echo-bytes (list<u8>)", {m, :capsid, [instance, "echo-bytes", bytes, batch]}},
          {"Capsid echo-string (string)", {m, :capsid, [instance, "echo-string", string, batch]}},
          {"plain Rust NIF echo (copy)", {m, :nif, [bytes, batch]}}
        ] do
      s = Measure.stats(Measure.sample(mfa, batch, opts))
      {label, size, name, s}
    end
  end
  |> List.flatten()

Report.header("Data transfer: echo")

IO.puts("""
Each call sends the payload in and gets it back. Throughput counts the
payload once per call (one direction): MB/s = bytes / median call time,
with MB = 10⁶ bytes; so the target "1 GB/s" is 1,000 MB/s. Median and p99
of batch means (1 KiB: 200 calls per batch, 64 KiB: 10, 1 MiB: 1), up to
#{opts[:samples]} batches or #{opts[:max_ms]} ms per row after #{opts[:warmup]} ms of warm-up.
The NIF echo copies the binary once (into a new binary); Capsid copies it
into the guest's linear memory and back out (and validates UTF-8 for
strings).
""")

rows =
  for {label, size, name, s} <- results do
    [
      label,
      name,
      Report.dur(s.median),
      Report.dur(s.p99),
      Report.int(Measure.mb_per_s(size, s.median)),
      s.n
    ]
  end

IO.puts(
  Report.table(
    ["size", "path", "median/call", "p99/call", "MB/s (median)", "batches"],
    rows,
    [:left, :left, :right, :right, :right, :right]
  )
)

mib =
  Enum.find(results, fn {_, size, name, _} ->
    size == 1_048_576 and String.starts_with?(name, "Capsid echo-bytes")
  end)

{_, _, _, s} = mib

IO.puts(
  "1 MiB list<u8> echo through Capsid: **#{Report.int(Measure.mb_per_s(1_048_576, s.median))} MB/s**.\n"
)

Report.noise(started)
