# Shared helpers of the benchmark scripts (`Code.require_file` this first).
#
# Everything timed here runs in compiled code: the modules below are
# compiled when this file is required, and each script defines its own loop
# modules. Top-level script code is interpreted by erl_eval and is only
# used to orchestrate, never inside a timed region.

defmodule Capsid.Bench.Native do
  @moduledoc false
  # Builds the native baseline crates (only those) and locates their output.

  @root Path.expand("..", __DIR__)

  def root, do: @root

  def target_dir, do: System.get_env("CARGO_TARGET_DIR") || Path.join(@root, "target")

  @doc "Runs `cargo build --release` for the bench crates; cargo skips up-to-date ones."
  def build! do
    args = [
      "build",
      "--release",
      "--quiet",
      "-p",
      "capsid_bench_baseline",
      "-p",
      "capsid_bench_port"
    ]

    case System.cmd("cargo", args, cd: @root, stderr_to_stdout: true) do
      {_, 0} ->
        :ok

      {out, status} ->
        IO.puts(:stderr, out)
        raise "cargo #{Enum.join(args, " ")} failed with status #{status}"
    end
  end

  def baseline_nif_path, do: Path.join([target_dir(), "release", "libcapsid_bench_baseline"])
  def port_server_path, do: Path.join([target_dir(), "release", "capsid_bench_port"])
end

defmodule Capsid.Bench.Baseline do
  @moduledoc false
  # The plain rustler NIF of bench/baseline_nif: same work as the bench
  # guest, no wasmtime. `load/0` builds it if needed and loads it.

  def load do
    Capsid.Bench.Native.build!()

    case :erlang.load_nif(String.to_charlist(Capsid.Bench.Native.baseline_nif_path()), 0) do
      :ok -> :ok
      # Already loaded in this VM (a second require of this file).
      {:error, {:reload, _}} -> :ok
      {:error, reason} -> raise "cannot load the baseline NIF: #{inspect(reason)}"
    end
  end

  def add(_a, _b), do: :erlang.nif_error(:nif_not_loaded)
  def echo(_bin), do: :erlang.nif_error(:nif_not_loaded)
  def sha256(_bin), do: :erlang.nif_error(:nif_not_loaded)
end

defmodule Capsid.Bench.Sha256 do
  @moduledoc false
  # SHA-256 in pure Elixir (FIPS 180-4), written for reasonable speed:
  # blocks are matched as sub-binaries (no copy of the input), the message
  # schedule is built by matching a reversed 16-word window, and rotations
  # mask before shifting so every intermediate stays a small integer.

  import Bitwise

  @mask 0xFFFFFFFF

  @k [
    0x428A2F98,
    0x71374491,
    0xB5C0FBCF,
    0xE9B5DBA5,
    0x3956C25B,
    0x59F111F1,
    0x923F82A4,
    0xAB1C5ED5,
    0xD807AA98,
    0x12835B01,
    0x243185BE,
    0x550C7DC3,
    0x72BE5D74,
    0x80DEB1FE,
    0x9BDC06A7,
    0xC19BF174,
    0xE49B69C1,
    0xEFBE4786,
    0x0FC19DC6,
    0x240CA1CC,
    0x2DE92C6F,
    0x4A7484AA,
    0x5CB0A9DC,
    0x76F988DA,
    0x983E5152,
    0xA831C66D,
    0xB00327C8,
    0xBF597FC7,
    0xC6E00BF3,
    0xD5A79147,
    0x06CA6351,
    0x14292967,
    0x27B70A85,
    0x2E1B2138,
    0x4D2C6DFC,
    0x53380D13,
    0x650A7354,
    0x766A0ABB,
    0x81C2C92E,
    0x92722C85,
    0xA2BFE8A1,
    0xA81A664B,
    0xC24B8B70,
    0xC76C51A3,
    0xD192E819,
    0xD6990624,
    0xF40E3585,
    0x106AA070,
    0x19A4C116,
    0x1E376C08,
    0x2748774C,
    0x34B0BCB5,
    0x391C0CB3,
    0x4ED8AA4A,
    0x5B9CCA4F,
    0x682E6FF3,
    0x748F82EE,
    0x78A5636F,
    0x84C87814,
    0x8CC70208,
    0x90BEFFFA,
    0xA4506CEB,
    0xBEF9A3F7,
    0xC67178F2
  ]

  @h0 {0x6A09E667, 0xBB67AE85, 0x3C6EF372, 0xA54FF53A, 0x510E527F, 0x9B05688C, 0x1F83D9AB,
       0x5BE0CD19}

  @compile {:inline, rotr: 2}

  def hash(data) when is_binary(data) do
    size = byte_size(data)
    full = size - rem(size, 64)
    <<body::binary-size(full), rest::binary>> = data

    # 0x80, zeros up to 56 mod 64, then the bit length: one or two blocks.
    zeros = rem(119 - byte_size(rest), 64)
    tail = <<rest::binary, 0x80, 0::size(zeros)-unit(8), size * 8::64>>

    {a, b, c, d, e, f, g, h} = body |> blocks(@h0) |> then(&blocks(tail, &1))
    <<a::32, b::32, c::32, d::32, e::32, f::32, g::32, h::32>>
  end

  defp blocks(<<block::binary-64, rest::binary>>, state), do: blocks(rest, compress(block, state))
  defp blocks(<<>>, state), do: state

  defp compress(
         <<w0::32, w1::32, w2::32, w3::32, w4::32, w5::32, w6::32, w7::32, w8::32, w9::32, w10::32,
           w11::32, w12::32, w13::32, w14::32, w15::32>>,
         {a, b, c, d, e, f, g, h}
       ) do
    window = [w15, w14, w13, w12, w11, w10, w9, w8, w7, w6, w5, w4, w3, w2, w1, w0]
    w = window |> schedule(48) |> Enum.reverse()
    {a2, b2, c2, d2, e2, f2, g2, h2} = rounds(w, @k, a, b, c, d, e, f, g, h)

    {a + a2 &&& @mask, b + b2 &&& @mask, c + c2 &&& @mask, d + d2 &&& @mask, e + e2 &&& @mask,
     f + f2 &&& @mask, g + g2 &&& @mask, h + h2 &&& @mask}
  end

  # `acc` is the schedule so far, newest word first: position i holds w[t-1-i].
  defp schedule(acc, 0), do: acc

  defp schedule([_, w2, _, _, _, _, w7, _, _, _, _, _, _, _, w15, w16 | _] = acc, n) do
    s0 = bxor(bxor(rotr(w15, 7), rotr(w15, 18)), w15 >>> 3)
    s1 = bxor(bxor(rotr(w2, 17), rotr(w2, 19)), w2 >>> 10)
    schedule([w16 + s0 + w7 + s1 &&& @mask | acc], n - 1)
  end

  defp rounds([], [], a, b, c, d, e, f, g, h), do: {a, b, c, d, e, f, g, h}

  defp rounds([w | ws], [k | ks], a, b, c, d, e, f, g, h) do
    s1 = bxor(bxor(rotr(e, 6), rotr(e, 11)), rotr(e, 25))
    ch = bxor(e &&& f, bnot(e) &&& g)
    t1 = h + s1 + ch + k + w
    s0 = bxor(bxor(rotr(a, 2), rotr(a, 13)), rotr(a, 22))
    maj = bxor(bxor(a &&& b, a &&& c), b &&& c)
    t2 = s0 + maj
    rounds(ws, ks, t1 + t2 &&& @mask, a, b, c, d + t1 &&& @mask, e, f, g)
  end

  defp rotr(x, n), do: x >>> n ||| (x &&& (1 <<< n) - 1) <<< (32 - n)
end

defmodule Capsid.Bench.Measure do
  @moduledoc false
  # Sampling and statistics. A sample is one batch of calls timed with
  # :erlang.monotonic_time(:nanosecond) around an `apply/3` of a compiled
  # loop; its per-call time is the batch time divided by the batch size.

  @doc """
  Runs `{m, f, a}` (a loop doing `per_batch` operations) first for
  `:warmup` ms, then repeatedly until `:samples` samples are taken or
  `:max_ms` have passed (at least `:min_samples`). Returns per-operation ns
  (floats), one per sample.
  """
  def sample({m, f, a}, per_batch, opts \\ []) do
    warmup = Keyword.get(opts, :warmup, 300)
    samples = Keyword.get(opts, :samples, 200)
    min_samples = Keyword.get(opts, :min_samples, 5)
    max_ms = Keyword.get(opts, :max_ms, 3_000)

    deadline = now() + warmup * 1_000_000
    warm(m, f, a, deadline)
    :erlang.garbage_collect()

    deadline = now() + max_ms * 1_000_000
    collect(m, f, a, per_batch, samples, min_samples, deadline, [])
  end

  defp warm(m, f, a, deadline) do
    apply(m, f, a)
    if now() < deadline, do: warm(m, f, a, deadline), else: :ok
  end

  defp collect(_m, _f, _a, _per, 0, _min, _deadline, acc), do: Enum.reverse(acc)

  defp collect(m, f, a, per, left, min, deadline, acc) do
    t0 = now()
    apply(m, f, a)
    t1 = now()
    acc = [(t1 - t0) / per | acc]

    if t1 > deadline and length(acc) >= min,
      do: Enum.reverse(acc),
      else: collect(m, f, a, per, left - 1, min, deadline, acc)
  end

  @doc "Times one `{m, f, a}` apply, in ns, with its result."
  def time({m, f, a}) do
    t0 = now()
    result = apply(m, f, a)
    {now() - t0, result}
  end

  def now, do: :erlang.monotonic_time(:nanosecond)

  @doc "Median of a non-empty list of numbers."
  def median(xs), do: percentile(xs, 50)

  @doc "Nearest-rank percentile `p` (0..100) of a non-empty list."
  def percentile(xs, p) do
    sorted = Enum.sort(xs)
    n = length(sorted)
    rank = max(ceil(p / 100 * n), 1)
    Enum.at(sorted, rank - 1)
  end

  @doc "Summary of per-operation ns samples."
  def stats(ns) do
    med = median(ns)

    %{
      n: length(ns),
      median: med,
      p99: percentile(ns, 99),
      min: Enum.min(ns),
      max: Enum.max(ns),
      per_s: if(med > 0, do: 1.0e9 / med, else: :infinity)
    }
  end

  @doc "Bytes per second (decimal MB/s) for `bytes` per operation at `ns` per operation."
  def mb_per_s(bytes, ns), do: bytes / ns * 1.0e9 / 1.0e6

  @doc """
  CPU time counters for `other_load/2`: the machine's busy ticks
  (/proc/stat, steal included) and this OS process's (/proc/self/stat).
  """
  def cpu_snapshot do
    machine =
      case File.read("/proc/stat") do
        {:ok, "cpu " <> rest} ->
          [user, nice, system, _idle, _iowait, irq, softirq, steal | _] =
            rest
            |> String.split("\n", parts: 2)
            |> hd()
            |> String.split()
            |> Enum.map(&String.to_integer/1)

          user + nice + system + irq + softirq + steal

        _ ->
          nil
      end

    self =
      case File.read("/proc/self/stat") do
        {:ok, stat} ->
          # Fields after the ")" of the command name; utime and stime are
          # fields 14 and 15 of the whole line.
          [_, after_comm] = String.split(stat, ") ", parts: 2)
          fields = String.split(after_comm)
          String.to_integer(Enum.at(fields, 11)) + String.to_integer(Enum.at(fields, 12))

        _ ->
          nil
      end

    {machine, self, now()}
  end

  @doc """
  Cores' worth of CPU that *other* processes (and the hypervisor, as steal)
  used between two snapshots: a noise indicator (clock ticks of 10 ms).
  """
  def other_load({m0, s0, t0}, {m1, s1, t1}) when is_integer(m0) and is_integer(s0) do
    hz = 100
    # Clamped at 0: the tick counters can make it slightly negative.
    max(0.0, (m1 - m0 - (s1 - s0)) / hz / ((t1 - t0) / 1.0e9))
  end

  def other_load(_, _), do: nil
end

defmodule Capsid.Bench.Report do
  @moduledoc false
  # Markdown output: machine header, tables, number formatting.

  def header(title) do
    IO.puts("## #{title}\n")
    IO.puts(machine())
  end

  @doc "A closing line: how much CPU other processes took while the script ran."
  def noise(since) do
    case Capsid.Bench.Measure.other_load(since, Capsid.Bench.Measure.cpu_snapshot()) do
      nil ->
        :ok

      cores ->
        IO.puts(
          "_Other processes (and hypervisor steal) used #{f(cores, 2)} cores on average " <>
            "while this script ran (of #{System.schedulers_online()})._\n"
        )
    end
  end

  def machine do
    cpuinfo = read("/proc/cpuinfo")
    meminfo = read("/proc/meminfo")

    cpu =
      case Regex.run(~r/^model name\s*:\s*(.+)$/m, cpuinfo) do
        [_, model] -> String.trim(model)
        _ -> "unknown"
      end

    mem =
      case Regex.run(~r/^MemTotal:\s*(\d+) kB/m, meminfo) do
        [_, kb] -> "#{Float.round(String.to_integer(kb) / 1024 / 1024, 1)} GiB"
        _ -> "unknown"
      end

    load = read("/proc/loadavg") |> String.split() |> Enum.take(3) |> Enum.join(" ")

    rows = [
      {"date (UTC)", DateTime.utc_now() |> DateTime.truncate(:second) |> DateTime.to_iso8601()},
      {"CPU", cpu},
      {"cores (nproc) / schedulers online", "#{cmd("nproc", [])} / #{System.schedulers_online()}"},
      {"memory", mem},
      {"load average (1/5/15 min) at start", load},
      {"OTP / ERTS", "#{:erlang.system_info(:otp_release)} / #{:erlang.system_info(:version)}"},
      {"Elixir", System.version()},
      {"Rust", cmd("rustc", ["--version"])},
      {"MIX_ENV", to_string(Mix.env())},
      {"git", git()}
    ]

    table(["machine", ""], Enum.map(rows, fn {k, v} -> [k, v] end), [:left, :left])
  end

  defp git do
    rev = cmd("git", ["-C", Capsid.Bench.Native.root(), "rev-parse", "--short", "HEAD"])

    dirty =
      case cmd("git", ["-C", Capsid.Bench.Native.root(), "status", "--porcelain"]) do
        "" -> ""
        _ -> " (with uncommitted changes)"
      end

    rev <> dirty
  end

  defp read(path) do
    case File.read(path) do
      {:ok, s} -> s
      _ -> ""
    end
  end

  defp cmd(name, args) do
    case System.find_executable(name) && System.cmd(name, args, stderr_to_stdout: true) do
      {out, 0} -> String.trim(out)
      _ -> "unknown"
    end
  end

  @doc """
  A markdown table. `align` is a list of :left/:right per column
  (default: first column left, others right).
  """
  def table(headers, rows, align \\ nil) do
    align = align || [:left | List.duplicate(:right, length(headers) - 1)]
    rows = Enum.map(rows, fn row -> Enum.map(row, &to_string/1) end)

    widths =
      [headers | rows]
      |> Enum.zip()
      |> Enum.map(fn col -> col |> Tuple.to_list() |> Enum.map(&String.length/1) |> Enum.max() end)
      |> Enum.map(&max(&1, 3))

    line = fn cells ->
      cells
      |> Enum.zip(Enum.zip(widths, align))
      |> Enum.map(fn
        {cell, {w, :right}} -> String.pad_leading(cell, w)
        {cell, {w, :left}} -> String.pad_trailing(cell, w)
      end)
      |> then(&("| " <> Enum.join(&1, " | ") <> " |"))
    end

    sep =
      widths
      |> Enum.zip(align)
      |> Enum.map(fn
        {w, :right} -> String.duplicate("-", w - 1) <> ":"
        {w, :left} -> String.duplicate("-", w)
      end)
      |> then(&("| " <> Enum.join(&1, " | ") <> " |"))

    Enum.join([line.(headers), sep | Enum.map(rows, line)], "\n") <> "\n"
  end

  @doc "Integer with thousands separators."
  def int(x) when is_float(x), do: int(round(x))

  def int(x) when is_integer(x) do
    sign = if x < 0, do: "-", else: ""

    digits =
      x
      |> abs()
      |> Integer.to_string()
      |> String.reverse()
      |> String.graphemes()
      |> Enum.chunk_every(3)
      |> Enum.map_join(",", &Enum.join/1)
      |> String.reverse()

    sign <> digits
  end

  @doc "Float with `d` decimals."
  def f(x, d \\ 1), do: :erlang.float_to_binary(x / 1, decimals: d)

  @doc "A ratio like `12.3×`."
  def ratio(x, d \\ 1), do: f(x, d) <> "×"

  @doc "ns as a readable duration."
  def dur(ns) when ns < 10_000, do: "#{f(ns, 0)} ns"
  def dur(ns) when ns < 10_000_000, do: "#{f(ns / 1_000, 1)} µs"
  def dur(ns) when ns < 10_000_000_000, do: "#{f(ns / 1_000_000, 1)} ms"
  def dur(ns), do: "#{f(ns / 1_000_000_000, 2)} s"
end

defmodule Capsid.Bench.Guest do
  @moduledoc false
  # The bench guest, loaded once per script.

  def start!(load_opts \\ []) do
    path = Capsid.Guests.path(:bench)

    unless File.exists?(path) do
      raise "#{path} is missing: run `mix compile` first"
    end

    component = Capsid.Component.load!(path, load_opts)
    {:ok, pid} = Capsid.Instance.start_link(component: component)
    {component, pid}
  end
end
