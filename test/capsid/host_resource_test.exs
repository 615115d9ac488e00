defmodule Capsid.HostResourceTest do
  @moduledoc """
  Host resources: a `ledger` the component imports, implemented in Elixir
  (guest `ledger`, world `capsid:ledger/ledgers`), and a hand-written
  component (test/fixtures/hand/forge.wat) that plays with raw handles as
  a hostile guest would.
  """
  use ExUnit.Case, async: true

  alias Capsid.{Error, Trap}

  @forge Path.expand("../fixtures/hand/forge.wat", __DIR__)

  setup_all do
    wasm = Path.join(System.tmp_dir!(), "capsid-forge-#{System.unique_integer([:positive])}.wasm")
    {_, 0} = System.cmd(Capsid.Hostile.wat2wasm!(), [@forge, wasm], stderr_to_stdout: true)
    on_exit(fn -> File.rm(wasm) end)

    %{
      ledger: Capsid.Component.load!(Capsid.Guests.path(:ledger)),
      forge: Capsid.Component.load!(wasm, cache: false)
    }
  end

  # A ledger's state is a map; its entries are counted in an ETS table, and
  # every drop and archive is reported to the test process.
  defp imports(test, table) do
    make = fn name -> %{name: name, id: make_ref()} end

    %{
      "[constructor]ledger" => make,
      "[static]ledger.open" => fn name -> make.("opened " <> name) end,
      "[method]ledger.record" => fn %{id: id}, _entry ->
        :ets.update_counter(table, id, 1, {id, 0})
      end,
      "[method]ledger.name" => fn %{name: name} -> name end,
      "[resource-drop]ledger" => fn ledger -> send(test, {:dropped, ledger}) end,
      "archive" => fn ledger -> send(test, {:archived, ledger}) end,
      "find" => fn
        "nobody" -> nil
        name -> make.(name)
      end
    }
  end

  defp start(c, imports, opts \\ []) do
    start_supervised!(
      {Capsid.Instance, [component: c, imports: imports] ++ opts},
      id: make_ref()
    )
  end

  setup %{ledger: c} do
    table = :ets.new(:entries, [:public])
    %{pid: start(c, imports(self(), table)), table: table}
  end

  defp ledger(name), do: %{name: name, id: make_ref()}

  defp drops(acc \\ []) do
    receive do
      {:dropped, l} -> drops([l | acc])
    after
      0 -> Enum.reverse(acc)
    end
  end

  test "the guest makes, uses and drops a host resource: the drop function gets its state",
       %{pid: pid} do
    assert Capsid.call(pid, "scratch", ["a", ["x", "y", "z"]]) == {:ok, 3}
    assert [%{name: "a"}] = drops()
    assert Capsid.call(pid, "scratch", ["b", []]) == {:ok, 0}
    assert [%{name: "b"}] = drops()
  end

  test "an own<R> result is the state again, and Elixir has it: no drop", %{pid: pid} do
    assert {:ok, %{name: "opened k", id: id}} = Capsid.call(pid, "keep", ["k"])
    assert is_reference(id)
    assert drops() == []
    assert Capsid.call(pid, "held", []) == {:ok, 0}
  end

  test "a borrow<R> argument lends the term for the call", %{pid: pid, table: table} do
    l = ledger("lent")
    assert Capsid.call(pid, "audit", [l, "one"]) == {:ok, 1}
    assert Capsid.call(pid, "audit", [l, "two"]) == {:ok, 2}
    assert :ets.lookup(table, l.id) == [{l.id, 2}]
    assert drops() == []
  end

  test "a list of own<R>: each term goes in, each is dropped", %{pid: pid} do
    ls = [ledger("a"), ledger("b"), ledger("a")]
    assert Capsid.call(pid, "names", [ls]) == {:ok, ["a", "b", "a"]}
    assert drops() == ls
    assert Capsid.call(pid, "names", [[]]) == {:ok, []}
    assert drops() == []
  end

  test "an own<R> argument gives the term to the guest, which drops it", %{pid: pid} do
    l = ledger("given")
    assert Capsid.call(pid, "adopt", [l]) == {:ok, "given"}
    assert drops() == [l]
  end

  test "an own<R> import argument is the state, and leaves the guest", %{pid: pid} do
    assert Capsid.call(pid, "make-and-archive", ["m"]) == {:ok, "m"}
    assert_received {:archived, %{name: "m"}}
    assert drops() == []
  end

  test "an option<own<R>> import result", %{pid: pid} do
    assert Capsid.call(pid, "lookup", ["ada"]) == {:ok, "ada"}
    assert [%{name: "ada"}] = drops()
    assert Capsid.call(pid, "lookup", ["nobody"]) == {:ok, nil}
    assert drops() == []
  end

  test "host resources in records, both ways", %{pid: pid} do
    l = ledger("in a record")
    assert Capsid.call(pid, "label", [l, "mine"]) == {:ok, %{label: "mine", book: l}}
    assert drops() == []
    assert Capsid.call(pid, "unlabel", [%{label: "x", book: l}]) == {:ok, "x: in a record"}
    assert drops() == [l]
  end

  test "held across calls, dropped later", %{pid: pid} do
    for n <- 1..5, do: Capsid.call!(pid, "hold", [ledger("h#{n}")])
    assert Capsid.call(pid, "held", []) == {:ok, 5}
    assert drops() == []
    assert Capsid.call(pid, "release", []) == {:ok, 5}
    assert Enum.map(drops(), & &1.name) == ~w(h1 h2 h3 h4 h5)
  end

  test "a guest that leaks host resources is stopped at max_handles", %{ledger: c} do
    table = :ets.new(:entries, [:public])
    pid = start(c, imports(self(), table), max_handles: 40)
    assert Capsid.call(pid, "hoard", [30]) == {:ok, 30}
    assert {:error, %Trap{kind: :memory_limit, message: msg}} = Capsid.call(pid, "hoard", [30])
    assert msg =~ "max_handles"
    # The instance recycled: a fresh guest holding nothing, working again.
    assert Capsid.call(pid, "held", []) == {:ok, 0}
    assert Capsid.call(pid, "hoard", [10]) == {:ok, 10}
    # A recycled store's host resources went with it, without drop calls.
    assert drops() == []
  end

  test "the drop function is optional", %{ledger: c} do
    table = :ets.new(:entries, [:public])
    pid = start(c, Map.delete(imports(self(), table), "[resource-drop]ledger"))
    assert Capsid.call(pid, "scratch", ["quiet", ["x"]]) == {:ok, 1}
    assert Capsid.call(pid, "adopt", [ledger("also quiet")]) == {:ok, "also quiet"}
    assert drops() == []
  end

  test "a drop function that raises fails the call that dropped", %{ledger: c} do
    table = :ets.new(:entries, [:public])
    imports = Map.put(imports(self(), table), "[resource-drop]ledger", fn _ -> raise "no" end)
    pid = start(c, imports)

    assert {:error, %Trap{kind: :import_failed, message: msg}} =
             Capsid.call(pid, "adopt", [ledger("x")])

    assert msg =~ "no"
    assert Capsid.call(pid, "held", []) == {:ok, 0}
  end

  test "the constructor and methods are required, the drop function is not", %{ledger: c} do
    assert {:error, %Error{kind: :link, message: msg}} =
             Capsid.Instance.start_link(component: c, imports: %{})

    assert msg =~ "[constructor]ledger"
    refute msg =~ "resource-drop"

    host = Capsid.Component.host_imports(c) |> Enum.map(& &1.function)
    assert "[constructor]ledger" in host and "[method]ledger.record" in host
    refute Enum.any?(host, &String.starts_with?(&1, "[resource-drop]"))

    drop = Enum.find(Capsid.Component.imports(c), &(&1.function == "[resource-drop]ledger"))
    assert drop.name == "capsid:ledger/books@0.1.0#[resource-drop]ledger"
    assert drop.params == [{"self", {:own, "ledger"}}]
  end

  test "imports of a host resource by their qualified names", %{ledger: c} do
    table = :ets.new(:entries, [:public])

    imports =
      Map.new(imports(self(), table), fn
        {"[" <> _ = key, fun} -> {"capsid:ledger/books#" <> key, fun}
        other -> other
      end)

    pid = start(c, imports)
    assert Capsid.call(pid, "scratch", ["q", ["x"]]) == {:ok, 1}
    assert [%{name: "q"}] = drops()
  end

  describe "bindings" do
    alias Capsid.Test.Ledgers.Desk

    test "functions taking and giving host resources take and give their terms",
         %{pid: pid} do
      l = ledger("bound")
      assert Desk.audit(pid, l, "e") == {:ok, 1}
      assert Desk.label!(pid, l, "t") == %{label: "t", book: l}
      assert Desk.adopt!(pid, l) == "bound"
      assert drops() == [l]
    end

    test "their specs say term(), not Capsid.Resource.t()" do
      {:ok, specs} = Code.Typespec.fetch_specs(Desk)
      {_, [spec | _]} = List.keyfind(specs, {:audit, 3}, 0)
      quoted = Code.Typespec.spec_to_quoted(:audit, spec) |> Macro.to_string()
      assert quoted =~ ~r"audit\(.+, term\(\), String.t\(\)\)"
      refute Code.ensure_loaded?(Capsid.Test.Ledgers.Desk.Ledger)
    end
  end

  describe "a hostile guest's raw handles" do
    setup %{forge: c} do
      test = self()

      imports = %{
        "[constructor]ledger" => fn -> make_ref() end,
        "[method]ledger.count" => fn ref ->
          send(test, {:counted, ref})
          7
        end,
        "[resource-drop]ledger" => fn ref -> send(test, {:dropped, ref}) end
      }

      %{a: start(c, imports), b: start(c, imports)}
    end

    test "a handle it was never given traps, and the instance recycles", %{a: a} do
      assert {:error, %Trap{message: msg}} = Capsid.call(a, "count", [5])
      assert msg =~ "handle"
      refute_received {:counted, _}
      assert {:ok, h} = Capsid.call(a, "make", [])
      assert Capsid.call(a, "count", [h]) == {:ok, 7}
      assert_received {:counted, ref} when is_reference(ref)
    end

    test "a handle after its drop traps; the drop function ran once", %{a: a} do
      {:ok, h} = Capsid.call(a, "make", [])
      assert Capsid.call(a, "drop", [h]) == {:ok, nil}
      assert_received {:dropped, ref} when is_reference(ref)
      assert {:error, %Trap{}} = Capsid.call(a, "count", [h])
      refute_received {:counted, _}
      {:ok, h} = Capsid.call(a, "make", [])
      assert {:ok, nil} = Capsid.call(a, "drop", [h])
      assert {:error, %Trap{}} = Capsid.call(a, "drop", [h])
      assert_received {:dropped, _}
      refute_received {:dropped, _}
    end

    test "another instance's handle number names nothing here", %{a: a, b: b} do
      {:ok, h} = Capsid.call(a, "make", [])
      assert {:error, %Trap{}} = Capsid.call(b, "count", [h])
      refute_received {:counted, _}
      assert Capsid.call(a, "count", [h]) == {:ok, 7}
    end

    test "a recycled instance's old handles name nothing", %{a: a} do
      {:ok, h} = Capsid.call(a, "make", [])
      assert {:error, %Trap{}} = Capsid.call(a, "count", [h + 1000])
      assert {:error, %Trap{}} = Capsid.call(a, "count", [h])
      refute_received {:counted, _}
    end
  end
end
