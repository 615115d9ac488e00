defmodule Capsid.TestCluster do
  @moduledoc false
  # Peer nodes for the cluster tests: OTP's :peer on the loopback address,
  # each running Capsid from this node's code path. The functions below
  # that run on peers live here (compiled, so every peer can load them).

  @doc "Makes this node distributed (starting epmd if needed)."
  def distribute! do
    unless Node.alive?() do
      epmd = System.find_executable("epmd") || raise "epmd not found (Erlang's erts)"
      {_, 0} = System.cmd(epmd, ["-daemon"])
      # `-daemon` returns before epmd listens: registering at once failed
      # with econnrefused.
      true = wait_for_epmd(100)
      name = :"capsid_test_#{System.unique_integer([:positive])}@127.0.0.1"
      {:ok, _} = :net_kernel.start(name, %{name_domain: :longnames})
    end

    :ok
  end

  defp wait_for_epmd(0), do: false

  defp wait_for_epmd(tries) do
    case :erl_epmd.names(~c"127.0.0.1") do
      {:ok, _} ->
        true

      {:error, _} ->
        Process.sleep(50)
        wait_for_epmd(tries - 1)
    end
  end

  @doc """
  Starts a peer running Capsid (with this node's cache directory and the
  given application env), linked to the calling process: `{peer, node}`.
  With `start?` false, Capsid's code is there but not started.
  """
  def start_peer!(env \\ [], start? \\ true) do
    distribute!()
    name = :"capsid_peer_#{System.unique_integer([:positive])}"

    {:ok, peer, node} =
      :peer.start_link(%{name: name, host: ~c"127.0.0.1", longnames: true, wait_boot: 60_000})

    :ok = :erpc.call(node, :code, :add_paths, [:code.get_path()])
    cache = Application.get_env(:capsid, :cache_dir)

    for {key, value} <- [cache_dir: cache] ++ env do
      :ok = :erpc.call(node, Application, :put_env, [:capsid, key, value])
    end

    # :error: global's notices about a peer the tests stopped are expected.
    :ok = :erpc.call(node, Application, :put_env, [:logger, :level, :error])

    if start?,
      do: {:ok, _} = :erpc.call(node, Application, :ensure_all_started, [:capsid], 60_000)

    {peer, node}
  end

  @doc "Calls `Capsid.call/4` on `node`."
  def call(node, target, function, args, opts \\ []) do
    :erpc.call(node, Capsid, :call, [target, function, args, opts], 30_000)
  end

  @doc """
  Starts a stream of calls on `node` (`Capsid.call(name, function, [])` in
  a loop) until `stop/1`; returns its pid.
  """
  def stream(node, name, function) do
    parent = self()
    Node.spawn_link(node, __MODULE__, :stream_loop, [parent, name, function, %{}, []])
  end

  @doc "Stops a stream: `{results_by_value, failures}`."
  def stop(stream) do
    ref = make_ref()
    send(stream, {:stop, self(), ref})

    receive do
      {^ref, counts, failures} -> {counts, failures}
    after
      30_000 -> raise "stream #{inspect(stream)} did not stop"
    end
  end

  @doc false
  def stream_loop(parent, name, function, counts, failures) do
    receive do
      {:stop, from, ref} -> send(from, {ref, counts, Enum.reverse(failures)})
    after
      0 ->
        case Capsid.call(name, function, [], timeout: 5_000) do
          {:ok, v} ->
            stream_loop(parent, name, function, Map.update(counts, v, 1, &(&1 + 1)), failures)

          {:error, e} ->
            stream_loop(parent, name, function, counts, [e | failures])
        end
    end
  end

  @doc "How many calls this node's current version of deployment `name` has run."
  def served(name) do
    pool = :sys.get_state(Capsid.Deployment.whereis(name)).current.pool.pid
    Capsid.Pool.info(pool).calls
  end

  @doc "The pids of this node's current instances of deployment `name`."
  def members(name) do
    pool = :sys.get_state(Capsid.Deployment.whereis(name)).current.pool.pid
    Capsid.Pool.members(pool)
  end

  @doc "An import for the faulty guest that exists on every node."
  def hook(x), do: x + 1
end
