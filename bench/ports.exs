# Capsid vs an Erlang Port: the usual way to run native code outside the VM.
# `add` and a 64 KiB echo through bench/port_server ({:packet, 4}) and
# through the bench guest.
#
#     mix run bench/ports.exs

Code.require_file("support.exs", __DIR__)
started = Capsid.Bench.Measure.cpu_snapshot()

alias Capsid.Bench.{Measure, Native, Report}

defmodule Capsid.Bench.Ports do
  @moduledoc false

  def open do
    Port.open({:spawn_executable, Native.port_server_path()}, [:binary, {:packet, 4}])
  end

  def port_add(_port, 0), do: :ok

  def port_add(port, n) do
    true = Port.command(port, <<1, n::signed-32, 1::signed-32>>)

    receive do
      {^port, {:data, <<_sum::signed-32>>}} -> port_add(port, n - 1)
    end
  end

  def port_echo(_port, _data, 0), do: :ok

  def port_echo(port, data, n) do
    true = Port.command(port, [2 | data])
    size = byte_size(data)

    receive do
      {^port, {:data, <<_::binary-size(size)>>}} -> port_echo(port, data, n - 1)
    end
  end

  def capsid_add(_target, 0), do: :ok

  def capsid_add(target, n) do
    {:ok, _} = Capsid.call(target, "add", [n, 1])
    capsid_add(target, n - 1)
  end

  def capsid_echo(_target, _data, 0), do: :ok

  def capsid_echo(target, data, n) do
    {:ok, out} = Capsid.call(target, "echo-bytes", [data])
    true = byte_size(out) == byte_size(data)
    capsid_echo(target, data, n - 1)
  end
end

alias Capsid.Bench.Ports

Native.build!()
port = Ports.open()
{_component, instance} = Capsid.Bench.Guest.start!()

# Correctness first.
true = Port.command(port, <<1, 40::signed-32, 2::signed-32>>)
receive do: ({^port, {:data, <<42::signed-32>>}} -> :ok), after: (5_000 -> raise "port: no reply")
data = :crypto.strong_rand_bytes(64 * 1024)
true = Port.command(port, [2 | data])
receive do: ({^port, {:data, ^data}} -> :ok), after: (5_000 -> raise "port: bad echo")
{:ok, 42} = Capsid.call(instance, "add", [40, 2])
{:ok, ^data} = Capsid.call(instance, "echo-bytes", [data])

opts = [warmup: 300, samples: 300, max_ms: 3_000, min_samples: 20]

cases = [
  {"add", "Erlang Port (port_server)", {Ports, :port_add, [port, 100]}, 100},
  {"add", "Capsid.call", {Ports, :capsid_add, [instance, 100]}, 100},
  {"echo 64 KiB", "Erlang Port (port_server)", {Ports, :port_echo, [port, data, 10]}, 10},
  {"echo 64 KiB", "Capsid.call", {Ports, :capsid_echo, [instance, data, 10]}, 10}
]

results =
  for {op, name, mfa, batch} <- cases do
    {op, name, Measure.stats(Measure.sample(mfa, batch, opts))}
  end

Port.close(port)

Report.header("Capsid vs an Erlang Port")

IO.puts("""
Round trips: request, then wait for the reply, then the next request (one
caller, nothing pipelined). The port server is a Rust binary reading and
writing `{:packet, 4}` frames with buffered stdio (bench/port_server);
`add` sends two big-endian i32 and gets one, `echo` sends 64 KiB and gets
them back. Median and p99 of batch means (add: 100 calls per batch, echo:
10), up to #{opts[:samples]} batches or #{opts[:max_ms]} ms per row.
""")

rows =
  results
  |> Enum.chunk_every(2)
  |> Enum.flat_map(fn [{_, _, port_s}, _] = pair ->
    for {op, name, s} <- pair do
      [
        op,
        name,
        Report.dur(s.median),
        Report.dur(s.p99),
        Report.int(s.per_s),
        Report.ratio(port_s.median / s.median),
        s.n
      ]
    end
  end)

IO.puts(
  Report.table(
    ["op", "path", "median/call", "p99/call", "calls/s", "speed-up vs port", "batches"],
    rows,
    [:left, :left, :right, :right, :right, :right, :right]
  )
)

Report.noise(started)
