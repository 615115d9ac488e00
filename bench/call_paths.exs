# The measurements behind docs/architecture.md: what a trivial call costs
# through each candidate call path. Run: mix run bench/call_paths.exs
defmodule CallPaths.Server do
  use GenServer
  def init(target), do: {:ok, target}
  def handle_call({f, args}, _from, target), do: {:reply, Capsid.call(target, f, args), target}
end

defmodule CallPaths do
  def loop(0, _f), do: :ok

  def loop(n, f),
    do:
      (
        f.()
        loop(n - 1, f)
      )

  def spawned(pid) do
    {p, ref} = spawn_monitor(fn -> exit({:r, Capsid.call(pid, "add", [1, 2])}) end)

    receive do
      {:DOWN, ^ref, _, ^p, reason} -> {:r, {:ok, 3}} = reason
    end
  end

  def measure(label, f, n \\ 200_000) do
    loop(20_000, f)

    samples =
      for _ <- 1..7 do
        t0 = :erlang.monotonic_time(:nanosecond)
        loop(n, f)
        (:erlang.monotonic_time(:nanosecond) - t0) / n
      end

    median = samples |> Enum.sort() |> Enum.at(3)
    IO.puts("| #{label} | #{Float.round(median, 0)} |")
    median
  end
end

c = Capsid.Component.load!(Capsid.Guests.path(:toolkit))
imports = %{"log" => fn _, _ -> :ok end, "get-config" => fn _ -> nil end}
{:ok, pid} = Capsid.Instance.start_link(component: c, imports: imports)
{:ok, server} = GenServer.start_link(CallPaths.Server, pid)

IO.puts("| path (trivial `add`) | median ns/call |\n|---|---|")

CallPaths.measure("caller runs the guest in its own process (Capsid.call)", fn ->
  {:ok, 3} = Capsid.call(pid, "add", [1, 2])
end)

CallPaths.measure("message round trip to an owning process, which runs it", fn ->
  {:ok, 3} = GenServer.call(server, {"add", [1, 2]})
end)

CallPaths.measure("a process spawned per call", fn -> CallPaths.spawned(pid) end, 50_000)

# The scheduler hop alone: a dirty-CPU NIF that returns at once (the compile
# NIF rejecting one garbage byte before compiling anything).
CallPaths.measure(
  "dirty-CPU NIF round trip alone (no guest call at all)",
  fn ->
    {:error, _} = Capsid.Native.component_compile(<<1>>, nil)
  end,
  100_000
)
